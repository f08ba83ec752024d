"""The official CSRA models, whole, around CSRATriton (above the module layer, below the tools).

The official code ships two model families, and a checkpoint it saves holds the trunk and the
head together:

* ``ResNet_CSRA(num_heads, lam, num_classes, depth, input_dim, cutmix)``: a torchvision ResNet
  (depth 18, 34, 50, 101 or 152) whose ``fc`` is emptied, with the CSRA head as ``classifier``
  (``classifier.multi_head.{k}.head.weight``) reading the last stage's (B, d, h, w) features;
* ``VIT_B16_224_CSRA`` / ``VIT_L16_224_CSRA``: a ViT whose parameter names timm's
  ``VisionTransformer`` shares (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``,
  ``norm``), the head reading the patch tokens (class token dropped) reshaped to
  (B, d, 14, 14) with a copy.

:class:`ResNetCSRA` and :func:`vit_csra` build the same architectures (ResNets from
torchvision, ViTs from timm) with :class:`~csra_triton.CSRATriton` as ``classifier``; the ViT's
tokens reach the head as a strided view (no copy). :func:`load_official_model` reads a full
official checkpoint (``module.`` prefixes of DataParallel included), works out the
architecture from its keys and shapes, and returns the model holding it. torchvision and timm
are imported only when a model is built (``pip install torchvision timm``).
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .interop import OfficialCheckpointError
from .module import CSRATriton

#: Blocks per stage of the official ResNet depths (torchvision's): (bottleneck?, layers).
RESNET_DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
                 50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3)),
                 152: (True, (3, 8, 36, 3))}
#: The official ViTs: embedding width -> (depth, attention heads), patch 16, 224 x 224.
VIT_SIZES = {768: (12, 12), 1024: (24, 16)}
#: The official default lam of each family (main.py: 0.1 for ResNets; VIT_*_CSRA: 0.3).
DEFAULT_LAM = {"resnet": 0.1, "vit": 0.3}


def _import(name: str):
    try:
        return __import__(name)
    except Exception as exc:   # noqa: BLE001 - torchvision fails to import beside some torch wheels
        raise ImportError(f"csra_triton.models needs {name} ({type(exc).__name__}: {exc}); "
                          f"install it with `pip install {name}`") from exc


def _loss(logits: Tensor, target: Tensor | None):
    if target is None:
        return logits
    return logits, F.binary_cross_entropy_with_logits(logits, target, reduction="mean")


class ResNetCSRA(nn.Module):
    """The official ``ResNet_CSRA`` with CSRATriton as ``classifier``: the same parameter names
    (``conv1``, ``bn1``, ``layer1``-``layer4``, ``classifier.*``), the same forward:
    ``model(x)`` -> logits, ``model(x, target)`` -> (logits, mean BCE-with-logits loss).

    Random initialisation (torchvision's); no weights are downloaded. ``input_dim`` defaults to
    the trunk's width (512 for depths 18 and 34, 2048 beyond)."""

    def __init__(self, num_heads: int, lam: float, num_classes: int, depth: int = 101,
                 input_dim: int | None = None, temperatures: Sequence[float] | None = None,
                 normalize: bool = True):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth: expected one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
        resnet = _import("torchvision").models.resnet
        bottleneck, layers = RESNET_DEPTHS[depth]
        trunk = resnet.ResNet(resnet.Bottleneck if bottleneck else resnet.BasicBlock, list(layers))
        width = 2048 if bottleneck else 512
        if input_dim is not None and input_dim != width:
            raise ValueError(f"input_dim: a ResNet-{depth} trunk gives {width} channels, "
                             f"got {input_dim}")
        self.depth = depth
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(trunk, name))
        self.classifier = CSRATriton(width, num_classes, num_heads, lam, temperatures, normalize)

    def backbone(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> the last stage's features (B, d, H/32, W/32), in x's memory format."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor, target: Tensor | None = None):
        return _loss(self.classifier(self.backbone(x)), target)


@functools.cache
def _vit_class():
    vt = _import("timm").models.vision_transformer

    class ViTCSRA(vt.VisionTransformer):
        """timm's VisionTransformer (no timm head) with CSRATriton as ``classifier`` reading
        the patch tokens in place; parameter names as the official ``VIT_CSRA``."""

        def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     num_classes=80, cls_num_heads=1, lam=0.3, temperatures=None,
                     normalize=True):
            super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                             num_classes=0, global_pool="token")
            self.classifier = CSRATriton(embed_dim, num_classes, cls_num_heads, lam,
                                         temperatures, normalize)

        def backbone(self, x: Tensor) -> Tensor:
            """(B, 3, H, W) -> patch tokens (B, N, d) after the final norm: a view that drops
            the class token, no copy."""
            return self.forward_features(x)[:, self.num_prefix_tokens:]

        def forward(self, x: Tensor, target: Tensor | None = None):
            return _loss(self.classifier.forward_tokens(self.backbone(x)), target)

    return ViTCSRA


def vit_csra(embed_dim: int = 768, depth: int | None = None, num_heads: int | None = None,
             num_classes: int = 80, cls_num_heads: int = 1, lam: float = 0.3,
             img_size: int = 224, patch_size: int = 16,
             temperatures: Sequence[float] | None = None, normalize: bool = True) -> nn.Module:
    """The official ``VIT_CSRA`` architecture on timm, with CSRATriton as ``classifier``.
    ``embed_dim`` 768 is ViT-B/16 (12 blocks, 12 attention heads), 1024 ViT-L/16 (24, 16).
    ``cls_num_heads`` and ``lam`` are the CSRA head's, as the official arguments."""
    if depth is None or num_heads is None:
        if embed_dim not in VIT_SIZES:
            raise ValueError(f"embed_dim: {embed_dim} is not an official ViT width "
                             f"({sorted(VIT_SIZES)}); pass depth and num_heads")
        depth = VIT_SIZES[embed_dim][0] if depth is None else depth
        num_heads = VIT_SIZES[embed_dim][1] if num_heads is None else num_heads
    return _vit_class()(img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                        cls_num_heads, lam, temperatures, normalize)


def vit_b16_224_csra(cls_num_heads: int = 1, num_classes: int = 80, lam: float = 0.3,
                     **kw) -> nn.Module:
    """The official ``VIT_B16_224_CSRA`` (random initialisation)."""
    return vit_csra(768, num_classes=num_classes, cls_num_heads=cls_num_heads, lam=lam, **kw)


def vit_l16_224_csra(cls_num_heads: int = 1, num_classes: int = 80, lam: float = 0.3,
                     **kw) -> nn.Module:
    """The official ``VIT_L16_224_CSRA`` (random initialisation)."""
    return vit_csra(1024, num_classes=num_classes, cls_num_heads=cls_num_heads, lam=lam, **kw)


# --------------------------------------------------------------------------- official checkpoints

_HEAD_KEY = re.compile(r"^classifier\.multi_head\.(\d+)\.head\.weight$")


#: Keys of full official checkpoints that the official forward never uses, per family: the
#: trunk's 1000-class ImageNet classifier. ``ResNet_CSRA`` empties ``fc`` at the end of its
#: ``init_weights`` (after loading ImageNet weights), so a model built without that step
#: (``pretrained`` off in a fork, ``init_weights`` skipped offline) saves ``fc.weight`` and
#: ``fc.bias``; ``VIT_CSRA`` replaces timm's ``head`` likewise. Dropped with a warning.
UNUSED_KEYS = {"resnet": ("fc.weight", "fc.bias"), "vit": ("head.weight", "head.bias")}


def _strip(state_dict: Mapping[str, Tensor]) -> dict:
    """The checkpoint without DataParallel's ``module.`` prefixes (and a nested
    ``state_dict``, as some training scripts save)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    return {re.sub(r"^(module\.)+", "", k): v for k, v in state_dict.items()}


def describe_official(state_dict: Mapping[str, Tensor]) -> dict:
    """The architecture of a full official checkpoint, from its keys and shapes:
    ``family`` ('resnet' or 'vit'), ``num_heads``, ``num_classes``, ``input_dim`` and the
    trunk's own (``depth``; for ViTs ``embed_dim``, ``img_size``, ``patch_size``)."""
    sd = _strip(state_dict)
    heads = sorted(int(m.group(1)) for k in sd if (m := _HEAD_KEY.match(k)))
    if not heads:
        raise OfficialCheckpointError("no CSRA head found: expected keys "
                                      "'classifier.multi_head.{k}.head.weight'")
    if heads != list(range(len(heads))):
        raise OfficialCheckpointError(f"classifier.multi_head: heads {heads} are not 0..{len(heads) - 1}")
    w0 = sd["classifier.multi_head.0.head.weight"]
    if not isinstance(w0, Tensor) or w0.dim() != 4:
        got = (f"has shape {tuple(w0.shape)}" if isinstance(w0, Tensor)
               else f"is a {type(w0).__name__}")
        raise OfficialCheckpointError(f"'classifier.multi_head.0.head.weight' {got}, expected a "
                                      f"(classes, in_ch, 1, 1) tensor")
    C, d = w0.shape[:2]
    out = dict(num_heads=len(heads), num_classes=int(C), input_dim=int(d))
    if "blocks.0.attn.qkv.weight" in sd:
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
        pw = sd["patch_embed.proj.weight"]
        n_pos = sd["pos_embed"].shape[1] - 1
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise OfficialCheckpointError(f"pos_embed: {n_pos} patch positions is not a square")
        out.update(family="vit", embed_dim=int(pw.shape[0]), depth=len(blocks),
                   patch_size=int(pw.shape[-1]), img_size=side * int(pw.shape[-1]))
        return out
    if "layer1.0.conv1.weight" in sd:
        bottleneck = "layer1.0.conv3.weight" in sd
        layers = tuple(len({int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")})
                       for i in range(1, 5))
        for depth, spec in RESNET_DEPTHS.items():
            if spec == (bottleneck, layers):
                out.update(family="resnet", depth=depth)
                return out
        raise OfficialCheckpointError(f"ResNet trunk with blocks {layers} "
                                      f"({'bottleneck' if bottleneck else 'basic'}) is not one of "
                                      f"the official depths {sorted(RESNET_DEPTHS)}")
    raise OfficialCheckpointError("neither a ResNet ('layer1.0.conv1.weight') nor a ViT "
                                  "('blocks.0.attn.qkv.weight') trunk in the checkpoint")


def load_official_model(state_dict: Mapping[str, Tensor], lam: float | None = None,
                        temperatures: Sequence[float] | None = None,
                        num_heads: int | None = None) -> nn.Module:
    """A :class:`ResNetCSRA` or timm ViT model holding a full official CSRA checkpoint (trunk and
    head). ``lam`` defaults to the official default of the family (0.1 ResNet, 0.3 ViT: it is
    not stored in checkpoints); ``temperatures`` to the official list for the head count;
    ``num_heads``: the ViT's attention heads, for widths other than the official 768 / 1024.
    Loading is strict: a missing or unexpected key raises :class:`OfficialCheckpointError`
    naming the keys, except the keys the official forward never uses (:data:`UNUSED_KEYS`: the
    trunk's ImageNet classifier), which are dropped with a warning naming them."""
    sd = _strip(state_dict)
    arch = describe_official(sd)
    unused = [k for k in UNUSED_KEYS[arch["family"]] if k in sd]
    if unused:
        warnings.warn(f"load_official_model: ignoring {unused}: the trunk's ImageNet classifier, "
                      f"which the official forward never uses", stacklevel=2)
        for k in unused:
            del sd[k]
    lam = DEFAULT_LAM[arch["family"]] if lam is None else lam
    if arch["family"] == "resnet":
        model = ResNetCSRA(arch["num_heads"], lam, arch["num_classes"], arch["depth"],
                           arch["input_dim"], temperatures)
    else:
        model = vit_csra(arch["embed_dim"], arch["depth"], num_heads, arch["num_classes"],
                         arch["num_heads"], lam, arch["img_size"], arch["patch_size"],
                         temperatures)
    missing, unexpected = _key_differences(model, sd)
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"official checkpoint ({arch['family']}, {arch}) does not fit the official model: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, unexpected keys "
            f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    model.load_state_dict(sd, strict=True)
    return model


def _key_differences(model: nn.Module, sd: Mapping[str, Tensor]) -> tuple[list, list]:
    """(missing, unexpected) keys of ``sd`` for ``model``, the CSRA head's official layout
    counted as the head's ``weight``."""
    want = set(model.state_dict())
    have = set()
    for k in sd:
        m = _HEAD_KEY.match(k)
        have.add("classifier.weight" if m else k)
    return sorted(want - have), sorted(have - want)
