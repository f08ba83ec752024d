"""Checkpoint interop: the official and mmpretrain CSRA layouts <-> CSRATriton's single weight.

The official module keeps one bias-free 1x1 conv per head: keys ``multi_head.{k}.head.weight`` of
shape (C, d, 1, 1), under the prefix of wherever the head sits in the full model (``classifier.``
in the official ResNet-CSRA), plus ``module.`` when saved from DataParallel. mmpretrain's
``CSRAClsHead`` keeps the same convs as ``csra_heads.{k}.head.weight`` (``head.`` in front inside
an ``ImageClassifier``), with the same temperatures per head count and the same math. CSRATriton
keeps one ``weight`` (H, C, d): ``weight[k] == <layout>.{k}.head.weight[:, :, 0, 0]``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

#: The containers of the per-head convs: the official code's and mmpretrain's.
LAYOUTS = ("multi_head", "csra_heads")
_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layout>multi_head|csra_heads)\.(?P<k>\d+)\.head\."
                  r"(?P<what>weight|bias)$")


def official_key(prefix: str, k: int, layout: str = "multi_head") -> str:
    """The key of head ``k``'s 1x1 conv weight under ``prefix`` (``layout``: "multi_head",
    the official code's, or "csra_heads", mmpretrain's)."""
    return f"{prefix}{layout}.{k}.head.weight"


class OfficialCheckpointError(ValueError):
    """The checkpoint does not hold an official CSRA head that fits."""


def find_official(state_dict: Mapping[str, Tensor], prefix: str | None = None) -> tuple[str, dict]:
    """(prefix, {head index: key}) of the official (or mmpretrain) head in ``state_dict``. With
    ``prefix=None`` the prefix is found (it must be unique: a checkpoint with two CSRA heads
    needs ``prefix``)."""
    found: dict[tuple[str, str], dict[int, str]] = {}
    for key in state_dict:
        m = _KEY.match(key)
        if m is None or (prefix is not None and m["prefix"] != prefix):
            continue
        if m["what"] == "bias":
            raise OfficialCheckpointError(
                f"official checkpoint: unexpected bias {key!r} (CSRA's 1x1 convs have no bias)")
        found.setdefault((m["prefix"], m["layout"]), {})[int(m["k"])] = key
    if not found:
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise OfficialCheckpointError(f"official checkpoint: no 'multi_head.{{k}}.head.weight' "
                                      f"(official) or 'csra_heads.{{k}}.head.weight' "
                                      f"(mmpretrain) keys found{where}")
    if len(found) > 1:
        where = sorted(p + layout for p, layout in found)
        raise OfficialCheckpointError(f"official checkpoint: CSRA heads under several prefixes "
                                      f"{where}; pass prefix=")
    ((pre, _layout), heads), = found.items()
    return pre, heads


def layout_of(keys: Mapping[int, str]) -> str:
    """"multi_head" or "csra_heads": the layout of keys found by :func:`find_official`."""
    return _KEY.match(next(iter(keys.values())))["layout"]


def official_to_weight(state_dict: Mapping[str, Tensor], prefix: str | None = None,
                       heads: int | None = None, classes: int | None = None,
                       in_ch: int | None = None) -> Tensor:
    """Stacks the official per-head weights into (H, C, d), checking every key and shape; the
    expected heads/classes/in_ch, where given, must match. Errors name the offending key."""
    pre, keys = find_official(state_dict, prefix)
    layout = layout_of(keys)
    n = max(keys) + 1
    if heads is not None and n > heads:
        raise OfficialCheckpointError(f"official checkpoint has more than heads={heads} heads "
                                      f"(found {keys[max(keys)]!r})")
    n = heads if heads is not None else n
    for k in range(n):
        if k not in keys:
            raise OfficialCheckpointError(f"official checkpoint: missing key "
                                          f"{official_key(pre, k, layout)!r} "
                                          f"(expected {n} heads)")
    for k in range(n):
        t = state_dict[keys[k]]
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = (f"has shape {tuple(t.shape)}" if isinstance(t, Tensor)
                   else f"is a {type(t).__name__}")
            raise OfficialCheckpointError(f"official checkpoint: {keys[k]!r} {got}, expected a "
                                          f"(classes, in_ch, 1, 1) tensor")
    first = state_dict[keys[0]]
    expect = (classes if classes is not None else first.shape[0],
              in_ch if in_ch is not None else first.shape[1], 1, 1)
    ws = []
    for k in range(n):
        t = state_dict[keys[k]]
        if tuple(t.shape) != expect:
            raise OfficialCheckpointError(f"official checkpoint: {keys[k]!r} has shape "
                                          f"{tuple(t.shape)}, expected {expect} "
                                          f"(classes, in_ch, 1, 1)")
        ws.append(t.reshape(expect[0], expect[1]))
    return torch.stack(ws)


def weight_to_official(weight: Tensor, prefix: str = "",
                       layout: str = "multi_head") -> dict[str, Tensor]:
    """{prefix + '<layout>.{k}.head.weight': (C, d, 1, 1)} from a (H, C, d) weight (copies)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    H, C, d = weight.shape
    return {official_key(prefix, k, layout): weight[k].detach().clone().view(C, d, 1, 1)
            for k in range(H)}


def unwrap(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The tensors of a checkpoint saved as ``{"state_dict": {...}, "meta": ...}`` (mmpretrain,
    mmengine and many training scripts), else ``state_dict`` itself."""
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict
