"""mmpretrain interop (issue 28) without mmpretrain: its ``CSRAClsHead`` layout
(``csra_heads.{k}.head.weight``, alone or under an ``ImageClassifier``'s ``head.``), a head
built from its config fields, and the export back, against an independent float64 rebuild of
its ``CSRAModule`` math (tests/official_models.py)."""
import pytest
import torch

import csra_triton
from csra_triton import OfficialCheckpointError
from helpers import rel_err
from official_models import MMPretrainClassifier, MMPretrainCSRAClsHead

BACKENDS = ["triton", "torch"]
TOL64 = 1e-12


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmpretrain_head_loads_and_agrees(backend, heads):
    torch.manual_seed(heads)
    theirs = MMPretrainCSRAClsHead(num_classes=7, in_channels=12, num_heads=heads, lam=0.2)
    theirs = theirs.double()
    ours = csra_triton.CSRATriton.from_mmpretrain(num_classes=7, in_channels=12,
                                                  num_heads=heads, lam=0.2).double()
    ours.load_state_dict(theirs.state_dict())           # strict
    x = torch.randn(3, 12, 4, 5, dtype=torch.float64)
    with csra_triton.use_backend(backend), torch.no_grad():
        assert rel_err(ours(x), theirs((x,))) <= TOL64
        built = csra_triton.load_official(theirs.state_dict(), lam=0.2).double()
        assert rel_err(built(x), theirs((x,))) <= TOL64


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmpretrain_classifier_checkpoint(backend):
    """A whole ImageClassifier's checkpoint file ({"state_dict": ..., "meta": ...}, the head
    under ``head.``): load_official finds the head; the export goes back under ``head.``."""
    torch.manual_seed(0)
    theirs = MMPretrainClassifier(num_classes=5, in_channels=8, num_heads=4, lam=0.1).double()
    ckpt = {"meta": {"epoch": 3}, "state_dict": theirs.state_dict()}
    head = csra_triton.load_official(ckpt, lam=0.1).double()
    assert (head.heads, head.classes, head.in_ch) == (4, 5, 8)
    feats = theirs.backbone(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    with csra_triton.use_backend(backend), torch.no_grad():
        assert rel_err(head(feats), theirs.head((feats,))) <= TOL64
    # export back: new weights round-trip into mmpretrain's layout, strict
    with torch.no_grad():
        head.weight.mul_(-1.5)
    sd = theirs.state_dict()
    sd.update(head.to_mmpretrain_state_dict(prefix="head."))
    theirs.load_state_dict(sd)
    with csra_triton.use_backend(backend), torch.no_grad():
        assert rel_err(head(feats), theirs.head((feats,))) <= TOL64


def test_mmpretrain_export_keys():
    head = csra_triton.CSRATriton(8, 3, heads=2)
    sd = head.to_mmpretrain_state_dict()
    assert sorted(sd) == ["csra_heads.0.head.weight", "csra_heads.1.head.weight"]
    assert sd["csra_heads.1.head.weight"].shape == (3, 8, 1, 1)
    assert torch.equal(sd["csra_heads.1.head.weight"][:, :, 0, 0], head.weight[1].detach())


def test_mmpretrain_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_heads"):
        csra_triton.CSRATriton.from_mmpretrain(num_classes=5, in_channels=8, num_heads=3, lam=0.1)
    with pytest.raises(ValueError, match="lam"):
        csra_triton.CSRATriton.from_mmpretrain(num_classes=5, in_channels=8, num_heads=2, lam=0.0)
    theirs = MMPretrainCSRAClsHead(num_classes=5, in_channels=8, num_heads=4, lam=0.1)
    sd = theirs.state_dict()
    del sd["csra_heads.2.head.weight"]
    with pytest.raises(RuntimeError, match="csra_heads.2.head.weight"):
        csra_triton.CSRATriton(8, 5, 4).load_state_dict(sd)
    mixed = dict(sd, **{"multi_head.0.head.weight": torch.zeros(5, 8, 1, 1)})
    with pytest.raises(OfficialCheckpointError, match="several prefixes"):
        csra_triton.load_official(mixed)
