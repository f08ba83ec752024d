"""The GPU architectures the kernels are built and checked for (plain data; the helpers layer, docs/architecture.md).

Each entry: the compile target Triton takes (``GPUTarget(backend, arch, warp_size)``), the
per-block shared-memory limit (CUDA: the opt-in maximum per block; AMD: LDS per workgroup), the
tensor-core instruction family every product must use there, the operand dtypes it runs, and
the GPUs it stands for. :func:`device_arch` names the arch of a live device: CUDA from its
capability, ROCm from ``gcnArchName`` (ROCm reports capability 9.4 for an MI300X, which is no
Hopper).
"""
from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    name: str
    backend: str              # "cuda" or "hip"
    target: int | str         # GPUTarget's arch: 90, "gfx942", ...
    warp_size: int
    smem_kb: int              # per-block shared memory (LDS) limit, KB
    mma: str                  # "wgmma", "tcgen05", "mma" (mma.sync), "mfma", "none"
    dtypes: tuple             # operand dtypes the kernels run in here ("bf16", "fp16", "fp32")
    gpus: str
    big_tiles: bool = False   # 128-row tiles (Hopper and Blackwell datacenter parts)

    @property
    def family(self) -> str:
        return "amd" if self.backend == "hip" else "nvidia"


ARCHS = {a.name: a for a in [
    Arch("sm_75", "cuda", 75, 32, 64, "none", ("fp16", "fp32"), "T4, RTX 20"),
    Arch("sm_80", "cuda", 80, 32, 163, "mma", ("bf16", "fp16", "fp32"), "A100, A30"),
    Arch("sm_86", "cuda", 86, 32, 99, "mma", ("bf16", "fp16", "fp32"), "A10, A40, RTX 30"),
    Arch("sm_89", "cuda", 89, 32, 99, "mma", ("bf16", "fp16", "fp32"), "L4, L40S, RTX 40"),
    Arch("sm_90a", "cuda", 90, 32, 227, "wgmma", ("bf16", "fp16", "fp32"), "H100, H200",
         big_tiles=True),
    Arch("sm_100a", "cuda", 100, 32, 227, "tcgen05", ("bf16", "fp16", "fp32"), "B200, GB200",
         big_tiles=True),
    Arch("sm_120", "cuda", 120, 32, 99, "mma", ("bf16", "fp16", "fp32"),
         "RTX 50, RTX PRO 6000"),
    Arch("gfx90a", "hip", "gfx90a", 64, 64, "mfma", ("bf16", "fp16", "fp32"), "MI210, MI250X"),
    Arch("gfx942", "hip", "gfx942", 64, 64, "mfma", ("bf16", "fp16", "fp32"), "MI300X, MI325X"),
    Arch("gfx950", "hip", "gfx950", 64, 160, "mfma", ("bf16", "fp16", "fp32"),
         "MI350X, MI355X"),
]}
#: What a CPU-side choice assumes when no device says otherwise (the project's measured GPU).
DEFAULT = "sm_90a"


#: CUDA capability (10 x major + minor) at which each CUDA arch starts, newest first.
_CUDA_FROM = [(120, "sm_120"), (100, "sm_100a"), (90, "sm_90a"), (89, "sm_89"), (86, "sm_86"),
              (80, "sm_80")]


def from_capability(major: int, minor: int = 0) -> str:
    """The CUDA arch name for a compute capability (the nearest one checked at or below it)."""
    cc = 10 * major + minor
    return next((name for start, name in _CUDA_FROM if cc >= start), "sm_75")


def from_gcn(name: str) -> str:
    """The AMD arch for a ``gcnArchName`` such as ``gfx942:sramecc+:xnack-``."""
    base = name.split(":")[0]
    if base in ARCHS:
        return base
    if base.startswith("gfx95"):
        return "gfx950"
    if base.startswith("gfx94"):
        return "gfx942"
    return "gfx90a"


def is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def device_arch(device: torch.device | None = None) -> str:
    """The arch of a live CUDA/ROCm device (``torch.cuda`` is HIP on ROCm); cached per device."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _device_arch(index)


@functools.cache
def _device_arch(index: int) -> str:
    if is_rocm():
        return from_gcn(torch.cuda.get_device_properties(index).gcnArchName)
    return from_capability(*torch.cuda.get_device_capability(index))


def device_name(device: torch.device | None = None) -> str:
    return torch.cuda.get_device_name(device)


def bf16_supported(arch: str) -> bool:
    return "bf16" in ARCHS[arch].dtypes


def lacks_bf16(device: torch.device) -> bool:
    """Whether a live device's arch has no bf16 tensor cores (Turing); the first time for each
    GPU and arch it warns that bf16 inputs there run the PyTorch fallback."""
    arch = device_arch(device)
    if bf16_supported(arch):
        return False
    _warn_bf16(device_name(device), arch)
    return True


@functools.cache
def _warn_bf16(gpu: str, arch: str):
    warnings.warn(f"csra_triton: {gpu} ({arch}) has no bf16 tensor cores "
                  f"and Triton cannot multiply bf16 there; bf16 inputs run the PyTorch fallback "
                  f"on the GPU (cuBLAS). fp16 (autocast dtype=torch.float16) or fp32 run the "
                  f"Triton kernels.", stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning raised by its caller at the first frame outside
    csra_triton and torch (the user's call, whichever entry it went through)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
            "csra_triton", "torch"):
        frame, level = frame.f_back, level + 1
    return level
