"""The benchmark shapes (docs/performance.md), their floors and the shape-spec parser: plain data,
used by the compile report, the tuner and the benchmarks alike."""
from __future__ import annotations

import dataclasses

import torch

from ..common import check_temperatures
from ..reference import OFFICIAL_TEMPERATURES

#: Measured ceilings (docs/performance.md): dense bf16/fp16 TFLOP/s (TF32 is half), copy TB/s.
CEILINGS = {"h100": dict(tflops=798.0, tbps=3.0), "h200": dict(tflops=790.0, tbps=4.3)}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    d: int
    h: int
    w: int
    C: int
    heads: int
    dtype: str = "bfloat16"

    @property
    def N(self) -> int:
        return self.h * self.w

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fwd_flops(self) -> float:
        return 2.0 * self.B * self.heads * self.C * self.d * self.N

    def fwd_bytes(self) -> float:
        """x and the weight read once, y written once, all in the benchmark dtype."""
        size = torch.empty((), dtype=self.torch_dtype).element_size()
        return size * (self.B * self.d * self.N + self.heads * self.C * self.d + self.B * self.C)

    def floor_ms(self, pass_: str, gpu: str) -> float | None:
        """max(FLOPs / rate, bytes / bandwidth); fwd+bwd is four forward-sized GEMMs (docs/performance.md)."""
        ceil = CEILINGS.get(gpu)
        if ceil is None:
            return None
        rate = ceil["tflops"] * (0.5 if self.dtype == "float32" else 1.0) * 1e12
        fwd = max(self.fwd_flops() / rate, self.fwd_bytes() / (ceil["tbps"] * 1e12)) * 1e3
        return fwd if pass_ == "fwd" else 4.0 * fwd

    def row_fields(self) -> dict:
        return dict(shape=self.name, B=self.B, d=self.d, h=self.h, w=self.w, C=self.C,
                    heads=self.heads, dtype=self.dtype)


SHAPES = {s.name: s for s in [
    Shape("coco-r101-448", 64, 2048, 14, 14, 80, 4),
    Shape("voc-r101-448", 64, 2048, 14, 14, 20, 1),
    Shape("coco-vitl16-448", 32, 1024, 28, 28, 80, 8),
    Shape("openimages-r101-448", 32, 2048, 14, 14, 9605, 4),
    Shape("latency-r101-224", 1, 2048, 7, 7, 80, 4),
    Shape("coco-r101-448-fp32", 64, 2048, 14, 14, 80, 4, "float32"),
]}
HEADLINE = "coco-r101-448"
#: What the CPU runs by default: the latency shape, the headline at small batches,
#: 9,605 classes, and fp32.
CPU_DEFAULT = "latency-r101-224,coco-r101-448@B=2"
#: CI smoke shapes: every code path at sizes the interpreter and a 2-core CPU finish quickly.
TINY = "coco-r101-448@B=2@d=32@h=3@w=3@C=5,latency-r101-224@d=16@C=3"


def parse_shapes(spec: str) -> list[Shape]:
    """Comma-separated names, each optionally followed by ``@field=value`` overrides
    (``coco-r101-448@B=8@C=9605``). ``all`` means every benchmark shape."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            out.extend(SHAPES.values())
            continue
        name, *overrides = item.split("@")
        if name not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {name!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[name]
        changes = {}
        for ov in overrides:
            key, _, val = ov.partition("=")
            if key not in ("B", "d", "h", "w", "C", "heads", "dtype") or not val:
                raise ValueError(f"--shapes: bad override {ov!r} in {item!r} "
                                 f"(expected B=, d=, h=, w=, C=, heads= or dtype=)")
            changes[key] = val if key == "dtype" else int(val)
        if changes:
            suffix = "@".join(f"{k}={v}" for k, v in changes.items())
            shape = dataclasses.replace(shape, name=f"{name}@{suffix}", **changes)
        out.append(shape)
    return out


def gpu_tag(device: torch.device) -> str:
    """'h100', 'h200', another short card name, or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h100", "h200", "a100", "l40s", "l4", "a10"):
        if tag in name:
            return tag
    return "".join(ch for ch in name.split()[-1] if ch.isalnum()) or "gpu"


def temperatures(heads: int) -> list[float]:
    """The official temperatures for ``heads`` heads, in the package's encoding (inf: a max
    head)."""
    return check_temperatures(OFFICIAL_TEMPERATURES[heads], heads)
