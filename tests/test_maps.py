"""Attention and score maps, the viz helpers, the maps command, official checkpoint interop."""
import importlib.util
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import csra_triton
from csra_triton import CSRATriton, interop, load_official
from csra_triton.reference import MHA, as_operand
from helpers import INF, rel_err

TEMPS = [1.0, 2.0, 4.0, INF]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _s64(x, head):
    """float64 scores: products on the weight rounded to x's dtype, norms from the weight as
    stored (the kernels' semantics, as the official code under autocast)."""
    w64 = head.weight.detach().double()
    w = as_operand(w64, x.dtype) / w64.norm(dim=-1, keepdim=True)
    return torch.einsum("hcd,bdn->bhcn", w, x.double().flatten(2))      # (B, H, C, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_maps_match_float64(dtype, backend, device):
    head = CSRATriton(12, 6, heads=4, temperatures=TEMPS).to(device)
    x = torch.randn(2, 12, 3, 5, device=device).to(dtype)
    s = _s64(x, head)
    scores = head.score_maps(x)
    assert scores.shape == (2, 4, 6, 3, 5)
    assert rel_err(scores.flatten(3), s) <= (1e-6 if dtype == torch.float32 else 1e-5)
    att = head.attention_maps(x).flatten(3)
    for k, t in enumerate(TEMPS):
        if math.isinf(t):
            expected = torch.nn.functional.one_hot(s[:, k].argmax(-1), s.shape[-1]).double()
        else:
            expected = torch.softmax(t * s[:, k], dim=-1)
        assert rel_err(att[:, k], expected) <= 1e-5
    assert torch.allclose(att.sum(-1), torch.ones(()).double().to(att), atol=1e-5)


def test_max_head_map_is_the_forwards_choice(backend, device):
    """With tied maxima the one-hot sits where the forward's argmax (and torch.max) put it."""
    head = CSRATriton(6, 3, heads=1, temperatures=[INF]).to(device)
    x = torch.randn(2, 6, 1, 2, device=device)
    x = torch.cat([x, x], dim=3)                                          # positions 0,1 == 2,3
    att = head.attention_maps(x).flatten(3)[:, 0]
    official = MHA.from_weight(head.weight.detach(), [99], 0.1).multi_head[0]
    s = official.head(x).flatten(2) / official.head.weight.flatten(1).norm(dim=1)[:, None]
    assert torch.equal(att.argmax(-1), s.max(dim=-1).indices)


def test_class_subset(backend, device):
    head = CSRATriton(10, 20, heads=4).to(device)
    x = torch.randn(2, 10, 4, 4, device=device)
    full_att, full_s = head.attention_maps(x), head.score_maps(x)
    pick = [17, 3, 3, 0]
    # Bitwise on CPU; on CUDA the class subset's product may take another GEMM kernel.
    same = torch.equal if device == "cpu" else (
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    assert same(head.attention_maps(x, classes=pick), full_att[:, :, pick])
    assert same(head.score_maps(x, classes=torch.tensor(pick)), full_s[:, :, pick])
    with pytest.raises(ValueError, match="classes"):
        head.score_maps(x, classes=[20])
    with pytest.raises(TypeError, match="classes"):
        head.score_maps(x, classes=[1.5])


def test_maps_for_9605_classes_stay_bounded(device, monkeypatch):
    """OpenImages-size label space at B=1: intermediates are chunked, so no allocation is much
    larger than the result itself; a 3-class subset costs a 3-class result."""
    from csra_triton import maps

    monkeypatch.setattr(maps, "CHUNK_ELEMS", 1 << 14)
    head = CSRATriton(8, 9605, heads=4).to(device)
    x = torch.randn(1, 8, 4, 4, device=device)
    with csra_triton.use_backend("torch"), profile(activities=[ProfilerActivity.CPU],
                                                  profile_memory=True) as prof:
        att = head.attention_maps(x)
    result_bytes = att.numel() * 4
    assert att.shape == (1, 4, 9605, 4, 4)
    assert max(e.cpu_memory_usage for e in prof.events()) <= 1.1 * result_bytes
    with csra_triton.use_backend("torch"):
        sub = head.attention_maps(x, classes=[5, 9000, 42])
    assert torch.equal(sub, att[:, :, [5, 9000, 42]])


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_overlay_and_grid(tmp_path):
    from csra_triton.tools import viz

    image = torch.rand(3, 32, 32)
    amap = torch.zeros(8, 8)
    amap[2, 5] = 1.0
    out = viz.overlay(image, amap, alpha=0.6)
    assert out.shape == (32, 32, 3) and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(viz.overlay(image, amap, alpha=0.0), image.permute(1, 2, 0))
    heat = viz.resize_map(amap, (32, 32))              # the hot cell lands on its 4x4 pixels
    y, x = divmod(int(heat.argmax()), 32)
    assert 8 <= y < 12 and 20 <= x < 24 and heat.max() == 1 and heat.min() == 0
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, amap, alpha=2)
    path = viz.topk_grid(torch.rand(2, 3, 32, 32), torch.randn(2, 5), torch.rand(2, 5, 8, 8),
                         list("abcde"), tmp_path / "g.png", k=2)
    assert path.stat().st_size > 1000


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU demo (trains on CPU); run by the CPU "
                    "CI, too slow beside the GPU check's parallel workers")
def test_maps_command_localises(tmp_path, capsys):
    """The example model's attention sits on the shapes: the attention mass inside the true
    shape's box is well above the box's area share (8.4x with these defaults when measured)."""
    from csra_triton.tools.cli import main

    out = tmp_path / "maps.png"
    assert main(["maps", "--out", str(out), "--images", "3"]) == 0
    text = capsys.readouterr().out
    ratio = float(text.split("box is ")[1].split("x")[0])
    assert ratio >= 4.0, text
    assert out.stat().st_size > 10_000


# --------------------------------------------------------------------------- checkpoint interop


def _official_model(heads=4, classes=6, d=16, wrap=None):
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, d, 1)
    model.classifier = MHA(heads, 0.1, d, classes)
    return torch.nn.DataParallel(model) if wrap == "dp" else model


@pytest.mark.parametrize("wrap", [None, "dp"])
def test_load_official_full_model(wrap, backend, device):
    official = _official_model(wrap=wrap).to(device)
    sd = official.state_dict()
    head = load_official(sd)                      # finds 'classifier.' (and 'module.') itself
    assert (head.heads, head.classes, head.in_ch) == (4, 6, 16)
    mha = (official.module if wrap else official).classifier
    head = head.to(device)
    x = torch.randn(2, 16, 5, 5, device=device)
    assert rel_err(head(x), mha(x)) <= 1e-5
    x64 = x.double()
    assert rel_err(head.double()(x64), mha.double()(x64)) <= 1e-12


def test_official_round_trip_is_exact():
    head = CSRATriton(16, 6, heads=4)
    sd = head.to_official_state_dict(prefix="classifier.")
    assert set(sd) == {f"classifier.multi_head.{k}.head.weight" for k in range(4)}
    assert all(v.shape == (6, 16, 1, 1) for v in sd.values())
    back = load_official(sd)
    assert torch.equal(back.weight, head.weight)
    official = MHA(4, 0.1, 16, 6)
    official.load_state_dict({k.removeprefix("classifier."): v for k, v in sd.items()})
    x = torch.randn(2, 16, 3, 3)
    assert rel_err(back(x), official(x)) <= 1e-5


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.pop("classifier.multi_head.2.head.weight"),
     "missing key 'classifier.multi_head.2.head.weight'"),
    (lambda sd: sd.__setitem__("classifier.multi_head.1.head.weight", torch.zeros(6, 16)),
     "'classifier.multi_head.1.head.weight' has shape"),
    (lambda sd: sd.__setitem__("classifier.multi_head.0.head.bias", torch.zeros(6)),
     "unexpected bias 'classifier.multi_head.0.head.bias'"),
    (lambda sd: [sd.pop(k) for k in list(sd) if "multi_head" in k], "no 'multi_head"),
])
def test_load_official_errors_name_the_key(mutate, match):
    sd = _official_model().state_dict()
    mutate(sd)
    with pytest.raises(interop.OfficialCheckpointError, match=match):
        load_official(sd)


def test_load_official_into_a_module_that_does_not_fit():
    sd = _official_model(heads=4, classes=6).state_dict()
    with pytest.raises(ValueError, match="more than heads=2"):
        load_official(sd, head=CSRATriton(16, 6, heads=2))
    with pytest.raises(ValueError, match=r"expected \(7, 16, 1, 1\)"):
        load_official(sd, head=CSRATriton(16, 7, heads=4))
    with pytest.raises(ValueError, match="missing key"):
        load_official(sd, head=CSRATriton(16, 6, heads=6))
