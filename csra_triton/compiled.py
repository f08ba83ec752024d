"""Compile report: every kernel the package launches, compiled for a GPU that need not be here.

``python -m csra_triton inspect`` (and tests/test_compiled.py) build the exact launches of
``triton_impl.prep_call`` / ``fwd_call`` / ``ds_call`` for a DESIGN shape on CPU tensors, compile
them with Triton's own compiler for ``sm_90a`` (H100/H200) or ``sm_80`` (A100), and read back:

* registers and spill (stack) bytes: ``cuobjdump -res-usage`` on the cubin (the tool ships in
  Triton's wheel, ``triton/backends/nvidia/bin``);
* shared memory: the compiled kernel's metadata;
* the MMA instruction: ``wgmma`` (Hopper warpgroup MMA), ``mma`` (``mma.sync``) or ``none``,
  from the PTX;

next to a traffic model of the launch (see :func:`model`). Specialisation (which integer
arguments are 1 or multiples of 16, pointer alignment) is Triton's own
(``native_specialize_impl``), so the compiled form is the one a GPU launch would build.
Results are cached per Triton version, arch, kernel, problem and config in
``~/.cache/csra_triton/inspect.json`` (or ``$CSRA_TRITON_INSPECT_CACHE``), which the tuner reads
to drop spilling configs without compiling them again.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from . import triton_impl, tuning
from .common import acc_dtype, empty, fwd_outputs
from .shapes import SHAPES, Shape, parse_shapes
from .tuning import inspect_key as _key, load_inspect_cache as _load_cache, save_inspect_cache as _save_cache

ARCHS = {"sm_90a": 90, "sm_80": 80}
KERNELS = ("prep", "fwd", "ds", "proj")
#: Kernels without a product (elementwise over weight rows): no MMA, one config.
ROW_KERNELS = ("prep", "proj")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}

#: Rates of the model (H100 SXM). Matrix rates: 798 TFLOP/s bf16/fp16 measured on this
#: project's H100 (DESIGN §3); TF32 half of that; fp64 tensor cores 67 TFLOP/s (datasheet);
#: fp32/fp64 on FMA units 67/34 TFLOP/s (datasheet). HBM: ~3.0 TB/s measured device copy.
#: L2 -> SM: 7.0 TB/s, the 5.5 TB/s measured by public microbenchmarks on the H100 PCIe part
#: scaled by SM count and clock (132/114 x 1980/1755 MHz ~ 1.3); public figures span 5.5-12.
RATES = dict(mma16=798e12, tf32=399e12, fp64=67e12, fma32=67e12, fma64=34e12,
             hbm=3.0e12, l2=7.0e12)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _triton_version() -> str:
    return tuning.triton_version()


# --------------------------------------------------------------------------- compiling


def compile_call(call: triton_impl.Call, arch: str) -> dict:
    """Compiles one launch for ``arch``; returns regs, spill_bytes, smem_bytes, mma."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = call.kernel
    if not hasattr(fn, "params"):
        raise RuntimeError("the kernels were loaded under TRITON_INTERPRET=1: the compile report "
                           "needs Triton's compiler (run it without TRITON_INTERPRET)")
    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = triton.compiler.make_backend(target)
    values = dict(zip([p.name for p in fn.params], call.args))
    values.update(call.constexprs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize, True)
        signature[p.name] = ty
        if ty == "constexpr":          # an integer argument equal to 1
            constexprs[(i,)] = v
        elif spec:
            attrs[(i,)] = backend.parse_attr(spec)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=dict(num_warps=call.num_warps, num_stages=call.num_stages))
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[:300]!r}")
    mma = ("wgmma" if "wgmma.mma_async" in ptx else
           "mma" if re.search(r"\bmma\.sync\.", ptx) else "none")
    return dict(regs=int(regs.group(1)), spill_bytes=int(stack.group(1)),
                smem_bytes=int(kernel.metadata.shared), mma=mma)


# --------------------------------------------------------------------------- launches


def _calls(shape: Shape, dtype: torch.dtype, cfg: tuning.Config, kernels=KERNELS) -> dict:
    """The launches the op makes for ``shape`` (CPU tensors of the real sizes, never touched:
    only their dtypes, strides and alignment matter), keyed by kernel name."""
    B, D, N, H, C = shape.B, shape.d, shape.N, shape.heads, shape.C
    x = torch.empty(B, D, N, dtype=dtype)
    weight = torch.empty(H, C, D, dtype=torch.float32)
    w_op = torch.empty(H * C, D, dtype=dtype)
    outs = fwd_outputs(x, H, C, empty)
    inv_n = outs[5]
    params = torch.empty(H + 2, dtype=acc_dtype(dtype))
    out = {}
    if "prep" in kernels:
        out["prep"] = triton_impl.prep_call(x, weight, True, w_op, inv_n, on_gpu=True)
    if "fwd" in kernels:
        out["fwd"] = triton_impl.fwd_call(x, w_op, inv_n, params, outs, cfg, H, on_gpu=True)
    if "ds" in kernels:
        chunk = triton_impl.ds_chunk_classes(H, C, B, N, cfg.BC)
        ws = torch.empty(H, chunk, B, N, dtype=dtype)
        g = torch.empty(B, C, dtype=dtype)
        out["ds"] = triton_impl.ds_call(x, w_op, inv_n, params, g, outs[1:5], 0, chunk, ws, cfg,
                                        H, on_gpu=True)
    if "proj" in kernels:
        G = torch.empty(H * C, D, dtype=dtype)
        out["proj"] = triton_impl.proj_call(G, weight, inv_n, torch.empty_like(weight), True)
    return out


# --------------------------------------------------------------------------- traffic model


def model(kernel: str, shape: Shape, dtype: torch.dtype, cfg: tuning.Config) -> dict:
    """Traffic model of one kernel's launch(es) for the whole call (all class chunks).

    * ``flops``: the MMA work the tiles execute, padding included (rows of absent heads/classes,
      positions beyond N up to the tile): 2 * programs * rows * positions * D.
    * ``sm_bytes``: bytes every program loads from L2/HBM into its SM, summed over programs:
      per program x[b] (its real positions) once per class block, and its weight rows once per
      position tile; plus the outputs it writes. This is what L2 bandwidth must carry.
    * ``hbm_bytes``: each tensor the kernel reads or writes, once: the least HBM traffic.
    * ``floor_us``: max(flops / MMA rate, hbm_bytes / HBM rate, sm_bytes / L2 rate) at
      :data:`RATES` (H100).
    """
    B, D, N, H, C = shape.B, shape.d, shape.N, shape.heads, shape.C
    xs = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    R = H * C
    if kernel == "prep":
        hbm = R * D * (4 + xs) + R * acc                    # fp32 weight in, w_op and inv_n out
        return _floor(0.0, hbm, hbm, dtype, cfg)
    if kernel == "proj":            # G (x's dtype) and the fp32 weight read twice, dW written
        hbm = R * D * (xs + 4 + 4) + R * acc
        return _floor(0.0, hbm + R * D * (xs + 4), hbm, dtype, cfg)
    hp = tuning.pow2(H)
    rows_tile = hp * cfg.BC
    n_cb = -(-C // cfg.BC)
    n_tiles = -(-N // cfg.BN)
    programs = B * n_cb
    flops = 2.0 * programs * rows_tile * n_tiles * cfg.BN * D
    x_reads = programs * D * N * xs                       # x[b] once per class block
    w_reads = B * R * D * xs * n_tiles                    # real rows only (masked rows not read)
    state = B * R * (3 * acc + 4)                         # m, l, att, argmax
    x_bytes, w_bytes = B * D * N * xs, R * D * xs
    if kernel == "fwd":
        out_bytes = state + B * C * xs + 0.0
        hbm = x_bytes + w_bytes + R * acc + out_bytes
        sm = x_reads + w_reads + R * acc * B + out_bytes
    else:  # ds: reads the state and grad_y, writes dS' (H*C, B, N) in x's dtype
        ds_bytes = B * R * N * xs
        hbm = x_bytes + w_bytes + R * acc + state + B * C * xs + ds_bytes
        sm = x_reads + w_reads + R * acc * B + state + B * C * xs + ds_bytes
    return _floor(flops, sm, hbm, dtype, cfg)


def _floor(flops, sm, hbm, dtype, cfg) -> dict:
    if dtype in (torch.float16, torch.bfloat16):
        rate = RATES["mma16"]
    elif dtype == torch.float32:
        rate = RATES["tf32"] if torch.backends.cudnn.allow_tf32 else RATES["fma32"]
    else:
        rate = RATES["fp64"]
    t = max(flops / rate, hbm / RATES["hbm"], sm / RATES["l2"])
    return dict(flops=flops, sm_bytes=sm, hbm_bytes=hbm, floor_us=t * 1e6)


# --------------------------------------------------------------------------- the report


def report(shapes: list[Shape], archs=tuple(ARCHS), dtypes=None, all_configs=False,
           kernels=KERNELS, progress=None) -> list[dict]:
    """One row per (kernel, arch, shape, dtype, config): compiled resources and the model."""
    cache = _load_cache()
    rows = []
    for shape in shapes:
        H, C, D, N = shape.heads, shape.C, shape.d, shape.N
        for dtype in (dtypes or [shape.torch_dtype]):
            size = torch.empty((), dtype=dtype).element_size()
            for arch in archs:
                cc = ARCHS[arch] // 10
                default = tuning.default_config(H, C, D, N, size, cc)
                configs = (tuning.config_space("fwd", H, C, D, N, size, cc=cc) if all_configs
                           else [default])
                for cfg in configs:
                    wanted = [k for k in kernels if k not in ROW_KERNELS or cfg == default]
                    for kernel, call in _calls(shape, dtype, cfg, wanted).items():
                        key = _key(kernel, arch, shape, dtype, cfg, call.kernel.cache_key)
                        if key not in cache:
                            cache[key] = compile_call(call, arch)
                            _save_cache(cache)
                        row = dict(kernel=kernel, arch=arch, shape=shape.name,
                                   dtype=str(dtype).replace("torch.", ""),
                                   config=_label(kernel, cfg),
                                   default=cfg == default, **cache[key],
                                   model=model(kernel, shape, dtype, cfg))
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def _label(kernel: str, cfg: tuning.Config) -> str:
    if kernel == "prep":
        return f"BR={triton_impl.PREP_ROWS} warps={triton_impl.PREP_WARPS}"
    if kernel == "proj":
        return f"BR={triton_impl.PROJ_ROWS} warps={triton_impl.PROJ_WARPS}"
    return cfg.label()


def table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | shape | dtype | config | default | regs | spill B | smem KB | "
             "MMA | GFLOP | SM GB | HBM MB | model µs (H100) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"]
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['shape']} | {r['dtype']} | {r['config']} | "
            f"{'yes' if r['default'] else ''} | {r['regs']} | {r['spill_bytes']} | "
            f"{r['smem_bytes'] / 1024:.0f} | {r['mma']} | {m['flops'] / 1e9:.1f} | "
            f"{m['sm_bytes'] / 1e9:.3f} | {m['hbm_bytes'] / 1e6:.1f} | {m['floor_us']:.1f} |")
    return "\n".join(lines)


def shapes_from(spec: str | None) -> list[Shape]:
    return list(SHAPES.values()) if spec in (None, "", "all") else parse_shapes(spec)

