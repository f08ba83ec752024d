"""Real backbones and the official models, whole (torchvision and timm; random init, no
downloads). Skipped with the reason where torchvision or timm cannot be imported (beside the CPU
torch 2.13 wheel torchvision fails: CI runs these in its torch 2.14.1 block)."""
import math

import pytest
import torch
from torch import nn

import csra_triton
from csra_triton import ops
from csra_triton.interop import OfficialCheckpointError
from csra_triton.reference import MHA
from helpers import rel_err


def _importable(name):
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001 - torchvision raises RuntimeError beside the CPU wheel
        return False


HAVE_TV = _importable("torchvision")
HAVE_TIMM = HAVE_TV and _importable("timm")
needs_tv = pytest.mark.skipif(not HAVE_TV, reason="torchvision cannot be imported here")
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm cannot be imported here")


def _randomise_norms(model):
    """BatchNorm statistics and affine terms away from their init, so eval mode means something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


# --------------------------------------------------------------------------- official models


@needs_tv
@pytest.mark.parametrize("depth", [18, 50])
def test_official_resnet_checkpoint_loads_and_agrees(depth):
    from csra_triton.models import ResNetCSRA, load_official_model
    from official_models import OfficialResNetCSRA

    width = 512 if depth == 18 else 2048
    official = OfficialResNetCSRA(4, 0.1, 20, depth=depth, input_dim=width)
    _randomise_norms(official)
    sd = {"module." + k: v for k, v in official.state_dict_official().items()}   # DataParallel
    model = load_official_model(sd)
    assert isinstance(model, ResNetCSRA) and model.depth == depth
    assert model.classifier.heads == 4 and model.classifier.classes == 20
    official, model = official.double().eval(), model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), official(x)) <= 1e-12
    logits, loss = model(x, torch.rand(2, 20, dtype=torch.float64).round())
    assert logits.shape == (2, 20) and loss.ndim == 0


@needs_tv
@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_resnet_layouts_load(depth, prefix):
    """The state dict the official ResNet_CSRA (a torchvision ResNet subclass) really holds, at
    every official depth, with and without DataParallel's prefix, loads strictly; with the
    trunk's ImageNet ``fc`` still in it (a model built without the official pretrained step),
    ``fc`` is dropped with a warning naming it."""
    from csra_triton.models import ResNetCSRA, load_official_model
    from official_models import OfficialResNetCSRA

    width = 512 if depth in (18, 34) else 2048
    for pretrained_step in (True, False):
        official = OfficialResNetCSRA(2, 0.1, 3, depth=depth, input_dim=width,
                                      pretrained_step=pretrained_step)
        sd = {prefix + k: v for k, v in official.state_dict().items()}
        assert ("fc.weight" in official.state_dict()) is not pretrained_step
        if pretrained_step:
            model = load_official_model(sd)
        else:
            with pytest.warns(UserWarning, match=r"fc\.weight.*fc\.bias.*never uses"):
                model = load_official_model(sd)
        assert isinstance(model, ResNetCSRA) and model.depth == depth
        got = model.state_dict()
        for k, v in official.state_dict().items():
            if k.startswith("fc."):
                continue
            if k.startswith("classifier."):
                kh = int(k.split(".")[2])
                assert torch.equal(got["classifier.weight"][kh], v[:, :, 0, 0])
            else:
                assert torch.equal(got[k], v), k


@needs_timm
def test_official_vit_checkpoint_loads_and_agrees():
    """ViT-B/16 (12 blocks, 768 wide) at 32 x 32 pixels (4 patches: quick), 4-head CSRA."""
    from csra_triton.models import load_official_model
    from official_models import OfficialViTCSRA

    official = OfficialViTCSRA(img_size=32, cls_num_heads=4, cls_num_cls=7, lam=0.3)
    model = load_official_model(official.state_dict_official())
    assert model.classifier.heads == 4 and model.classifier.lam == 0.3
    official, model = official.double().eval(), model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), official(x)) <= 1e-10


@needs_timm
@pytest.mark.parametrize("width, prefix, imagenet_head", [(768, "", False), (768, "module.", True),
                                                          (1024, "module.", False)],
                         ids=["B16", "B16-module-head", "L16-module"])
def test_official_vit_layouts_load(width, prefix, imagenet_head):
    """VIT_B16_224_CSRA / VIT_L16_224_CSRA checkpoints at 224 (every key the official class
    holds, random values) load strictly and every tensor lands where it belongs; timm's
    ImageNet ``head`` (which the official class replaces) is dropped with a warning."""
    from csra_triton import models
    from official_models import OfficialViTCSRA

    depth, heads = models.VIT_SIZES[width]
    with torch.device("meta"):
        official = OfficialViTCSRA(224, 16, width, depth, heads, cls_num_heads=4, cls_num_cls=20)
    sd = {prefix + k: torch.randn(v.shape) for k, v in official.state_dict().items()}
    if imagenet_head:
        sd.update({prefix + "head.weight": torch.randn(1000, width),
                   prefix + "head.bias": torch.randn(1000)})
        with pytest.warns(UserWarning, match=r"head\.weight.*head\.bias.*never uses"):
            model = models.load_official_model(sd)
    else:
        model = models.load_official_model(sd)
    got = model.state_dict()
    assert model.classifier.heads == 4 and model.classifier.lam == 0.3
    for k, v in sd.items():
        k = k.removeprefix(prefix)
        if k.startswith("head."):
            continue
        if k.startswith("classifier."):
            assert torch.equal(got["classifier.weight"][int(k.split(".")[2])], v[:, :, 0, 0])
        else:
            assert torch.equal(got[k], v), k


@needs_timm
@pytest.mark.parametrize("width", [768, 1024], ids=["B16", "L16"])
def test_official_vit_224_layouts_match(width):
    """VIT_B16_224_CSRA / VIT_L16_224_CSRA: the same parameter names and shapes (on the meta
    device: nothing is allocated)."""
    from csra_triton import models
    from official_models import OfficialViTCSRA

    depth, heads = models.VIT_SIZES[width]
    with torch.device("meta"):
        official = OfficialViTCSRA(224, 16, width, depth, heads, cls_num_heads=1, cls_num_cls=80)
        ours = (models.vit_b16_224_csra if width == 768 else models.vit_l16_224_csra)()
    want = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.pop("classifier.weight") == (1, 80, width)
    assert want.pop("classifier.multi_head.0.head.weight") == (80, width, 1, 1)
    assert got == want


@needs_tv
def test_load_official_model_errors_name_the_problem():
    from csra_triton.models import load_official_model
    from official_models import OfficialResNetCSRA

    sd = OfficialResNetCSRA(1, 0.1, 5, depth=18, input_dim=512).state_dict_official()
    no_head = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    with pytest.raises(OfficialCheckpointError, match="classifier.multi_head"):
        load_official_model(no_head)
    extra = dict(sd, **{"layer1.0.extra.weight": torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match="unexpected keys.*layer1.0.extra.weight"):
        load_official_model(extra)
    missing = {k: v for k, v in sd.items() if k != "layer4.1.bn2.running_var"}
    with pytest.raises(OfficialCheckpointError, match="missing keys.*layer4.1.bn2.running_var"):
        load_official_model(missing)
    with pytest.raises(OfficialCheckpointError, match="neither a ResNet"):
        load_official_model({k: v for k, v in sd.items() if k.startswith("classifier.")})


# --------------------------------------------------------------------------- real backbones


def _backbone(name):
    """(trunk: images -> features, layout ("nchw" or "tokens"), channels, image size)."""
    if name == "tv-resnet50":
        import torchvision

        m = torchvision.models.resnet50()
        trunk = nn.Sequential(*list(m.children())[:-2])
        return trunk, "nchw", 2048, 64
    if name == "tv-vit_b_16":
        import torchvision

        m = torchvision.models.vit_b_16(image_size=32)

        class Tokens(nn.Module):
            def __init__(self):
                super().__init__()
                self.vit = m

            def forward(self, x):
                x = self.vit._process_input(x)
                cls = self.vit.class_token.expand(x.shape[0], -1, -1)
                return self.vit.encoder(torch.cat([cls, x], dim=1))[:, 1:]
        return Tokens(), "tokens", 768, 32
    import timm

    if name == "timm-resnet50":
        return timm.create_model("resnet50", num_classes=0, global_pool=""), "nchw", 2048, 64
    m = timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0)

    class TimmTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = m

        def forward(self, x):
            return self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
    return TimmTokens(), "tokens", 384, 32


class WithHead(nn.Module):
    def __init__(self, trunk, head, layout):
        super().__init__()
        self.trunk, self.head, self.layout = trunk, head, layout

    def forward(self, x):
        f = self.trunk(x)
        if isinstance(self.head, MHA):         # the official head takes (B, d, h, w)
            if self.layout == "tokens":
                side = math.isqrt(f.shape[1])
                f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
            return self.head(f)
        return self.head(f) if self.layout == "nchw" else self.head.forward_tokens(f)


BACKBONES = [pytest.param("tv-resnet50", marks=needs_tv), pytest.param("tv-vit_b_16", marks=needs_tv),
             pytest.param("timm-resnet50", marks=needs_timm),
             pytest.param("timm-vit_small", marks=needs_timm)]


def _pair(name, C=6, H=4):
    import copy

    trunk, layout, d, size = _backbone(name)
    _randomise_norms(trunk)
    ours = WithHead(trunk, csra_triton.CSRATriton(d, C, H, lam=0.2), layout)
    official = WithHead(copy.deepcopy(trunk), MHA.from_weight(ours.head.weight.detach().clone(),
                                                              [1, 2, 4, 99], 0.2), layout)
    return ours, official, size


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_training_step_equals_official_head(name):
    """float64, train mode: logits, every gradient and the parameters after one SGD step equal
    those of the official head holding the same weights."""
    torch.manual_seed(0)
    ours, official, size = _pair(name)
    ours, official = ours.double().train(), official.double().train()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    target = torch.rand(2, 6, dtype=torch.float64).round()
    results = []
    for model in (ours, official):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logits = model(x)
        nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()   # (unused heads)
                 for p in model.trunk.parameters()]
        head_grad = (model.head.weight.grad if hasattr(model.head, "weight") else torch.stack(
            [h.head.weight.grad.flatten(1) for h in model.head.multi_head]))
        opt.step()
        results.append((logits.detach(), grads, head_grad.reshape(-1).clone(),
                        [p.detach().clone() for p in model.trunk.parameters()]))
    (y0, g0, h0, p0), (y1, g1, h1, p1) = results
    assert rel_err(y0, y1) <= 1e-12
    assert rel_err(h0, h1) <= 1e-10
    assert max(rel_err(a, b) for a, b in zip(g0, g1) if b.norm() > 0) <= 1e-9
    assert max(rel_err(a, b) for a, b in zip(p0, p1)) <= 1e-12


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_training_step_compiles(name):
    """torch.compile of the whole model (trunk + CSRATriton), one fp32 training step: its logits
    and head gradient are as close to float64 as the eager fp32 step's (Inductor reorders the
    trunk's sums, and train-mode BatchNorm over 2 images amplifies any reordering: eager fp32
    itself is ~1e-4 off float64 here), within 4x of eager's error."""
    import copy

    torch.manual_seed(0)
    torch._dynamo.reset()
    ours, _, size = _pair(name)
    ours.train()
    x = torch.randn(2, 3, size, size)
    target = torch.rand(2, 6).round()
    ref = copy.deepcopy(ours).double()
    outs = []
    for model, fn, dt in ((ref, ref, torch.float64), (ours, ours, torch.float32),
                          (ours, torch.compile(ours), torch.float32)):
        for p in model.parameters():
            p.grad = None
        logits = fn(x.to(dt))
        nn.functional.binary_cross_entropy_with_logits(logits, target.to(dt)).backward()
        outs.append((logits.detach(), model.head.weight.grad.clone()))
    (y64, g64), (ye, ge), (yc, gc) = outs
    assert rel_err(yc, y64) <= 4 * rel_err(ye, y64) + 1e-6
    assert rel_err(gc, g64) <= 4 * rel_err(ge, g64) + 1e-6


@pytest.mark.parametrize("name", [pytest.param("tv-resnet50", marks=needs_tv),
                                  pytest.param("timm-resnet50", marks=needs_timm),
                                  pytest.param("tv-vit_b_16", marks=needs_tv)])
def test_trunk_features_reach_the_op_without_a_copy(name, monkeypatch):
    """A channels_last trunk's features (and a ViT's patch tokens) reach the op as views of the
    trunk's own output."""
    ours, _, size = _pair(name)
    ours = ours.to(memory_format=torch.channels_last).eval()
    seen = {}
    ours.trunk.register_forward_hook(lambda m, i, o: seen.setdefault("trunk", o))
    def spy(forward):
        def wrapped(x3, *args, **kw):
            seen["op"] = x3
            return forward(x3, *args, **kw)
        return wrapped
    for impl in ops.IMPLEMENTATIONS.values():       # whichever implementation runs the call
        monkeypatch.setattr(impl, "forward", spy(impl.forward))
    with torch.no_grad():
        ours(torch.randn(2, 3, size, size).to(memory_format=torch.channels_last))
    if name.endswith("resnet50"):
        assert seen["trunk"].is_contiguous(memory_format=torch.channels_last)
    assert seen["op"].untyped_storage().data_ptr() == seen["trunk"].untyped_storage().data_ptr()
