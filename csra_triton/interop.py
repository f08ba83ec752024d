"""Official checkpoint interop: the official CSRA layout <-> CSRATriton's single weight.

The official module keeps one bias-free 1x1 conv per head: keys ``multi_head.{k}.head.weight`` of
shape (C, d, 1, 1), under the prefix of wherever the head sits in the full model (``classifier.``
in the official ResNet-CSRA), plus ``module.`` when saved from DataParallel. CSRATriton keeps one
``weight`` (H, C, d): ``weight[k] == multi_head.{k}.head.weight[:, :, 0, 0]``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

_KEY = re.compile(r"^(?P<prefix>.*?)multi_head\.(?P<k>\d+)\.head\.(?P<what>weight|bias)$")


def official_key(prefix: str, k: int) -> str:
    """The official key of head ``k``'s 1x1 conv weight under ``prefix``."""
    return f"{prefix}multi_head.{k}.head.weight"


class OfficialCheckpointError(ValueError):
    """The checkpoint does not hold an official CSRA head that fits."""


def find_official(state_dict: Mapping[str, Tensor], prefix: str | None = None) -> tuple[str, dict]:
    """(prefix, {head index: key}) of the official head in ``state_dict``. With ``prefix=None``
    the prefix is found (it must be unique: a checkpoint with two CSRA heads needs ``prefix``)."""
    found: dict[str, dict[int, str]] = {}
    for key in state_dict:
        m = _KEY.match(key)
        if m is None or (prefix is not None and m["prefix"] != prefix):
            continue
        if m["what"] == "bias":
            raise OfficialCheckpointError(
                f"official checkpoint: unexpected bias {key!r} (CSRA's 1x1 convs have no bias)")
        found.setdefault(m["prefix"], {})[int(m["k"])] = key
    if not found:
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise OfficialCheckpointError(f"official checkpoint: no 'multi_head.{{k}}.head.weight' "
                                      f"keys found{where}")
    if len(found) > 1:
        raise OfficialCheckpointError(f"official checkpoint: CSRA heads under several prefixes "
                                      f"{sorted(found)}; pass prefix=")
    (pre, heads), = found.items()
    return pre, heads


def official_to_weight(state_dict: Mapping[str, Tensor], prefix: str | None = None,
                       heads: int | None = None, classes: int | None = None,
                       in_ch: int | None = None) -> Tensor:
    """Stacks the official per-head weights into (H, C, d), checking every key and shape; the
    expected heads/classes/in_ch, where given, must match. Errors name the offending key."""
    pre, keys = find_official(state_dict, prefix)
    n = max(keys) + 1
    if heads is not None and n > heads:
        raise OfficialCheckpointError(f"official checkpoint has more than heads={heads} heads "
                                      f"(found {keys[max(keys)]!r})")
    n = heads if heads is not None else n
    for k in range(n):
        if k not in keys:
            raise OfficialCheckpointError(f"official checkpoint: missing key "
                                          f"{official_key(pre, k)!r} (expected {n} heads)")
    first = state_dict[keys[0]]
    expect = (classes if classes is not None else first.shape[0],
              in_ch if in_ch is not None else (first.shape[1] if first.dim() > 1 else -1), 1, 1)
    ws = []
    for k in range(n):
        t = state_dict[keys[k]]
        if tuple(t.shape) != expect:
            raise OfficialCheckpointError(f"official checkpoint: {keys[k]!r} has shape "
                                          f"{tuple(t.shape)}, expected {expect} "
                                          f"(classes, in_ch, 1, 1)")
        ws.append(t.reshape(expect[0], expect[1]))
    return torch.stack(ws)


def weight_to_official(weight: Tensor, prefix: str = "") -> dict[str, Tensor]:
    """{prefix + 'multi_head.{k}.head.weight': (C, d, 1, 1)} from a (H, C, d) weight (copies)."""
    H, C, d = weight.shape
    return {official_key(prefix, k): weight[k].detach().clone().view(C, d, 1, 1)
            for k in range(H)}
