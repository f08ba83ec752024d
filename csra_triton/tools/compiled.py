"""Compile report: every kernel the package launches, compiled for a GPU that need not be here.

``python -m csra_triton inspect`` (and tests/test_compiled.py) build the exact launches of
``triton_impl.prep_call`` / ``fwd_call`` / ``ds_call`` / ``proj_call`` for a benchmark shape and a
layout of x (NCHW, channels_last, tokens) on CPU tensors, compile them with Triton's own
compiler for any arch of ``archs.ARCHS`` (sm_75 ... sm_120, AMD gfx90a, gfx942, gfx950), and read
back:

* registers and spill bytes: ``cuobjdump -res-usage`` on the cubin for CUDA (the tool ships in
  Triton's wheel, ``triton/backends/nvidia/bin``); ``NumVgprs`` and ``ScratchSize`` from the AMD
  assembly;
* shared memory (LDS on AMD): the compiled kernel's metadata, against the arch's per-block limit;
* the MMA instruction of every product (``tl.dot`` site, after Triton's pipelining: each
  ``warp_group_dot``, ``tc_gen5_mma`` or ``tt.dot`` of the TTGIR) by family: ``wgmma``
  (Hopper), ``tcgen05`` (Blackwell), ``mma`` (mma.sync), ``mfma`` (AMD) or ``none`` (FMA); the
  row's ``mma`` names the family when every site has the same one, else ``mixed``;

next to a traffic model of the launch (see :func:`model`). Specialisation (which integer
arguments are 1 or multiples of 16, pointer alignment) is Triton's own
(``native_specialize_impl``), so the compiled form is the one a GPU launch would build.
Results are cached per Triton version, arch, kernel, problem and config in
``~/.cache/csra_triton/inspect.json`` (or ``$CSRA_TRITON_INSPECT_CACHE``), which the tuner reads
to drop spilling configs without compiling them again.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import torch

from .. import triton_impl, tuning
from ..archs import ARCHS as ARCH_INFO
from ..archs import DEFAULT as DEFAULT_ARCH
from ..common import acc_dtype, empty, fwd_outputs
from .progress import progress
from .shapes import SHAPES, Shape, parse_shapes
from ..tuning import inspect_key as _key, load_inspect_cache as _load_cache, save_inspect_cache as _save_cache

ARCHS = tuple(ARCH_INFO)
LAYOUTS = ("nchw", "channels_last", "tokens")
#: "fwd_keep" is the training forward where it writes its raw scores (``SAVE_A``), "ds_kept" the
#: elementwise dS' from them; both only for shapes whose scores are kept (H*C <= d).
KERNELS = ("prep", "fwd", "fwd_keep", "ds", "ds_kept", "proj")
#: Kernels without a product (elementwise over weight rows or scores): no MMA, one config.
ROW_KERNELS = ("prep", "proj", "ds_kept")
#: Kernels that read x (their compiled form depends on its layout).
X_KERNELS = ("fwd", "fwd_keep", "ds")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}

#: Rates of the model (H100 SXM). Matrix rates: 798 TFLOP/s bf16/fp16 measured on this
#: project's H100 (docs/performance.md); TF32 half of that; fp64 tensor cores 67 TFLOP/s (datasheet);
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


def _dot_sites(ttgir: str) -> dict:
    """{family: count} over the products of a kernel's TTGIR (after pipelining, which may
    repeat a source-level ``tl.dot`` in its prologue and epilogue)."""
    layouts = dict(re.findall(r"^#(\w+) = #ttg\.(\w+)<", ttgir, flags=re.M))
    sites: dict = {}
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            fam = "wgmma"
        elif "ttng.tc_gen5_mma " in line:
            fam = "tcgen05"
        elif re.search(r"= tt\.dot ", line):
            m = re.search(r"parent = #(\w+)", line)
            kind = layouts.get(m.group(1), "") if m else ""
            fam = ("mfma" if kind.startswith("amd_mfma") else
                   "wmma" if kind.startswith("amd_wmma") else
                   "mma" if kind == "nvidia_mma" else "none")
        else:
            continue
        sites[fam] = sites.get(fam, 0) + 1
    return sites


def compile_call(call: triton_impl.Call, arch: str) -> dict:
    """Compiles one launch for ``arch`` (a name of ``archs.ARCHS``); returns regs, spill_bytes,
    smem_bytes, mma (the family of every product, ``mixed`` if they differ, ``none`` without
    products or on FMA units) and mma_sites ({family: products})."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = call.kernel
    if not hasattr(fn, "params"):
        raise RuntimeError("the kernels were loaded under TRITON_INTERPRET=1: the compile report "
                           "needs Triton's compiler (run it without TRITON_INTERPRET)")
    info = ARCH_INFO[arch]
    target = GPUTarget(info.backend, info.target, info.warp_size)
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
    sites = _dot_sites(kernel.asm["ttgir"])
    if info.backend == "hip":
        amd = kernel.asm["amdgcn"]
        regs = re.search(r"NumVgprs:\s*(\d+)", amd)
        scratch = re.search(r"ScratchSize:\s*(\d+)", amd)
        if regs is None or scratch is None:
            raise RuntimeError("no NumVgprs/ScratchSize in the AMD assembly")
        regs, spill = int(regs.group(1)), int(scratch.group(1))
        if sites and "v_mfma" not in amd:
            sites = {"none": sum(sites.values())}
    else:
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        m_regs = re.search(r"REG:(\d+)", usage)
        m_stack = re.search(r"STACK:(\d+)", usage)
        if m_regs is None or m_stack is None:
            raise RuntimeError(f"unexpected cuobjdump output: {usage[:300]!r}")
        regs, spill = int(m_regs.group(1)), int(m_stack.group(1))
        instr = {"wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma", "mma": "mma.sync."}
        for fam in list(sites):        # a site counts only if its instruction made it to PTX
            if fam in instr and instr[fam] not in ptx:
                sites["none"] = sites.get("none", 0) + sites.pop(fam)
    fams = set(sites)
    mma = "none" if not fams else fams.pop() if len(fams) == 1 else "mixed"
    return dict(regs=regs, spill_bytes=spill, smem_bytes=int(kernel.metadata.shared), mma=mma,
                mma_sites=sites)


# --------------------------------------------------------------------------- launches


def x_like(shape: Shape, dtype: torch.dtype, layout: str = "nchw") -> torch.Tensor:
    """x (B, D, N) as the op sees it for features in ``layout`` (never touched: only its
    dtype, strides and alignment matter)."""
    B, D, N = shape.B, shape.d, shape.N
    if layout == "nchw":
        return torch.empty(B, D, N, dtype=dtype)
    if layout == "channels_last":
        return torch.empty(B, D, shape.h, shape.w, dtype=dtype,
                           memory_format=torch.channels_last).flatten(2)
    if layout == "tokens":
        return torch.empty(B, N, D, dtype=dtype).transpose(1, 2)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _calls(shape: Shape, dtype: torch.dtype, cfg: tuning.Config, kernels=KERNELS,
           layout: str = "nchw", target: str = DEFAULT_ARCH) -> dict:
    """The launches the op makes for ``shape`` on ``target`` (CPU tensors of the real sizes,
    never touched: only their dtypes, strides and alignment matter), keyed by kernel name."""
    B, D, N, H, C = shape.B, shape.d, shape.N, shape.heads, shape.C
    x = x_like(shape, dtype, layout)
    weight = torch.empty(H, C, D, dtype=torch.float32)
    w_op = torch.empty(H * C, D, dtype=dtype)
    outs = fwd_outputs(x, H, C, empty)
    inv_n = outs[5]
    params = torch.empty(H + 2, dtype=acc_dtype(dtype))
    out = {}
    if "prep" in kernels:
        out["prep"] = triton_impl.prep_call(x, weight, True, w_op, inv_n, target=target)
    if "fwd" in kernels:
        out["fwd"] = triton_impl.fwd_call(x, w_op, inv_n, params, outs, cfg, H, target=target)
    keeps = triton_impl.keeps_scores(x, H, C, target)
    scores = torch.empty(H, C, B, N, dtype=acc_dtype(dtype))
    if "fwd_keep" in kernels and keeps:
        out["fwd_keep"] = triton_impl.fwd_call(x, w_op, inv_n, params, outs, cfg, H,
                                               target=target, scores=scores)
    # the backward's first class chunk: its dS' workspace and grad_y
    chunk = triton_impl.ds_chunk_classes(H, C, B, N, cfg.BC)
    ws = torch.empty(H, chunk, B, N, dtype=dtype)
    g = torch.empty(B, C, dtype=dtype)
    if "ds" in kernels:
        out["ds"] = triton_impl.ds_call(x, w_op, inv_n, params, g, outs[1:5], 0, chunk, ws, cfg,
                                        H, target=target)
    if "ds_kept" in kernels and keeps:
        out["ds_kept"] = triton_impl.ds_kept_call(scores, inv_n, params, g, outs[1:5], 0, chunk,
                                                  ws, H, target=target)
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
    if kernel == "proj":            # G (x's dtype) and the fp32 weight read, dW written; both
        hbm = R * D * (xs + 4 + 4) + R * acc     # read again by a second pass for long rows
        again = R * D * (xs + 4) if D > triton_impl.row_tiles(D)[1] else 0
        return _floor(0.0, hbm + again, hbm, dtype, cfg)
    state = B * R * (3 * acc + 4)                         # m, l, att, argmax
    scores = B * R * N * acc
    if kernel == "ds_kept":         # the scores and the state read, dS' (x's dtype) written
        hbm = scores + state + B * C * xs + R * acc + B * R * N * xs
        return _floor(0.0, hbm, hbm, dtype, cfg)
    hp = tuning.pow2(H)
    rows_tile = hp * cfg.BC
    n_cb = -(-C // cfg.BC)
    n_tiles = -(-N // cfg.BN)
    programs = B * n_cb
    flops = 2.0 * programs * rows_tile * n_tiles * cfg.BN * D
    x_reads = programs * D * N * xs                       # x[b] once per class block
    w_reads = B * R * D * xs * n_tiles                    # real rows only (masked rows not read)
    x_bytes, w_bytes = B * D * N * xs, R * D * xs
    if kernel in ("fwd", "fwd_keep"):
        out_bytes = state + B * C * xs + (scores if kernel == "fwd_keep" else 0.0)
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


# --------------------------------------------------------------------------- time model v2

#: Rates of model v2 for the H200 (132 SMs at ~1.98 GHz), each with its source. Per SM:
#: bf16/fp16 MMA 790 TFLOP/s / 132 (docs/performance.md's dense rate); TF32 half of that; L2 -> SM
#: 4.66 TB/s / 132 (the committed L2 copy probe, bench/results/2026-11-27-h200.json: bytes
#: read + written from a resident 12 MiB buffer); HBM 2.76 TB/s in all (the HBM copy probe);
#: a dependent global load round trip 0.8 µs (public H100 pointer-chase figures, 0.5-0.9 µs,
#: an assumption: it sets the time of loops without pipelined loads); a launch's device-side
#: start and drain 2 µs (an assumption). Per-SM limits: 65,536 registers, 228 KB shared
#: memory, 64 warps, 32 CTAs (the Hopper datasheet). H100 SXM: the same SM count and limits,
#: HBM 3.0 TB/s (this project's H100 measurement), L2 and MMA as H200 (same clocks): scaled, not
#: measured.
RATES_V2 = {
    "h200": dict(sms=132, mma16_sm=790e12 / 132, tf32_sm=395e12 / 132, fma32_sm=67e12 / 132,
                 l2_sm=4.66e12 / 132, hbm=2.76e12, latency_s=0.8e-6, launch_s=2e-6,
                 regs_sm=65536, smem_sm=228 * 1024, warps_sm=64, ctas_sm=32),
    "h100": dict(sms=132, mma16_sm=798e12 / 132, tf32_sm=399e12 / 132, fma32_sm=67e12 / 132,
                 l2_sm=4.66e12 / 132, hbm=3.0e12, latency_s=0.8e-6, launch_s=2e-6,
                 regs_sm=65536, smem_sm=228 * 1024, warps_sm=64, ctas_sm=32),
}
#: What model v2 is calibrated on: the H200 v1 kernels at coco-r101-448 (bench/NOTES.md: ncu and
#: profiler device times, µs) and the openimages-r101-448 forward (the op's device time minus
#: its prep, which the model gives).
MEASURED_H200 = {("fwd", "coco-r101-448"): 81.0, ("ds", "coco-r101-448"): 75.5,
                 ("prep", "coco-r101-448"): 10.4}


def model_v2(kernel: str, shape: Shape, dtype: torch.dtype, cfg: tuning.Config, regs: int,
             smem: int, gpu: str = "h200", row_tiles: tuple | None = None) -> dict:
    """Time of one kernel's launches from its compiled resources and its tiles (model v2, bench/NOTES.md).

    * CTAs per SM: the fewest the registers (regs x threads), shared memory, warps and the CTA
      cap allow; the grid then runs in ``waves`` of ``SMs x CTAs per SM`` programs, a partial
      last wave costing a full one (its CTAs run as long);
    * per CTA: its MMA work with tile padding (rows of absent heads and classes, positions up to
      BN) at the SM's MMA rate (shared by its resident CTAs), and the bytes it pulls into the SM
      (x[b] once, its weight rows once per position tile, its outputs) at the SM's share of L2
      bandwidth; the main kernels pipeline their loads (cp.async stages), so the two overlap and
      the larger counts; the row kernels (prep, proj) walk d in dependent steps without
      pipelining: one load round trip a step, plus their bytes;
    * the launch: waves x per-CTA time / CTAs per SM (co-resident CTAs share the SM), at least
      the HBM floor, plus the launch's start and drain.

    ``row_tiles``: (rows, channels) per program of the row kernels, if not today's
    (:func:`triton_impl.row_tiles`; v1's were (8, 256), which the calibration uses).
    """
    R = RATES_V2[gpu]
    B, D, N, H, C = shape.B, shape.d, shape.N, shape.heads, shape.C
    xs = torch.empty((), dtype=dtype).element_size()
    v1 = model(kernel, shape, dtype, cfg)
    if kernel == "ds_kept":
        # elementwise streaming: many small CTAs, loads in flight across them (pipelined)
        warps = triton_impl.DS_KEPT_WARPS
        chunk = triton_impl.ds_chunk_classes(H, C, B, N, cfg.BC)
        br, _ = triton_impl.ds_kept_tiles(H * chunk, N)
        programs = -(-H * chunk // br) * B * -(-C // chunk)
        mma_s = 0.0
        pipelined = True
        per_cta = v1["sm_bytes"] / programs / R["l2_sm"]
    elif kernel in ("prep", "proj"):
        rows_per, bd = row_tiles or triton_impl.row_tiles(D)
        warps = triton_impl.ROW_WARPS
        programs = -(-H * C // rows_per)
        passes = 2 if kernel == "proj" and D > bd else 1     # proj: one pass over whole rows
        steps = -(-D // bd) * passes
        cta_bytes = v1["hbm_bytes"] / programs
        per_cta = steps * R["latency_s"] + cta_bytes / R["l2_sm"]
        pipelined = False
        mma_s = 0.0
    else:
        warps = cfg.num_warps
        hp = tuning.pow2(H)
        rows = hp * cfg.BC
        n_tiles = -(-N // cfg.BN)
        cb = -(-C // cfg.BC)
        if kernel == "ds":
            chunk = triton_impl.ds_chunk_classes(H, C, B, N, cfg.BC)
            cb = sum(-(-(min(C, c0 + chunk) - c0) // cfg.BC) for c0 in range(0, C, chunk))
        programs = B * cb
        flops = 2.0 * rows * n_tiles * cfg.BN * D
        rate = (R["mma16_sm"] if xs == 2 else
                (R["tf32_sm"] if torch.backends.cudnn.allow_tf32 and xs == 4 else R["fma32_sm"]))
        mma_s = flops / rate
        cta_bytes = v1["sm_bytes"] / programs
        pipelined = cfg.num_stages >= 2
        bytes_s = cta_bytes / R["l2_sm"]
        per_cta = max(mma_s, bytes_s) if pipelined else mma_s + bytes_s
    threads = 32 * warps
    per_sm = min(R["regs_sm"] // max(1, regs * threads), R["smem_sm"] // max(1, smem),
                 R["warps_sm"] // warps, R["ctas_sm"])
    per_sm = max(1, per_sm)
    waves = -(-programs // (R["sms"] * per_sm))
    if pipelined:
        # throughput-bound CTAs: co-resident ones share the SM's MMA and L2 rates, so the
        # busiest SM's time is its share of programs times one CTA's time alone
        busy = -(-programs // R["sms"]) * per_cta
    else:
        # latency-bound CTAs: co-resident ones overlap their round trips
        busy = waves * per_cta
    t = max(busy, v1["hbm_bytes"] / R["hbm"]) + R["launch_s"]
    return dict(gpu=gpu, programs=programs, ctas_per_sm=per_sm, waves=waves,
                tail=programs / (R["sms"] * per_sm) - (waves - 1), per_cta_us=per_cta * 1e6,
                mma_us=mma_s * 1e6, pipelined=pipelined, time_us=t * 1e6)


# --------------------------------------------------------------------------- the report


def report(shapes: list[Shape], archs=("sm_90a", "sm_80"), dtypes=None, all_configs=False,
           kernels=KERNELS, on_row=None, layouts=("nchw",)) -> list[dict]:
    """One row per (kernel, arch, shape, layout, dtype, config): compiled resources and the
    model. ``dtypes`` None: the shape's own dtype, or fp16 where the arch has no bf16 (sm_75);
    dtypes an arch does not run are skipped."""
    cache = _load_cache()
    rows = []
    for shape in progress(shapes, "inspect", unit="shape"):
        H, C, D, N = shape.heads, shape.C, shape.d, shape.N
        for arch in archs:
            info = ARCH_INFO[arch]
            for dtype in (dtypes or [_own_dtype(shape, arch)]):
                if dtype != torch.float64 and _short(dtype) not in info.dtypes:
                    continue
                size = torch.empty((), dtype=dtype).element_size()
                default = tuning.default_config(H, C, D, N, size, arch)
                configs = (tuning.config_space("fwd", H, C, D, N, size, arch=arch)
                           if all_configs else [default])
                for layout in layouts:
                    for cfg in configs:
                        wanted = [k for k in kernels if k not in ROW_KERNELS or cfg == default]
                        calls = _calls(shape, dtype, cfg, wanted, layout, arch)
                        for kernel, call in calls.items():
                            if kernel not in X_KERNELS and layout != layouts[0]:
                                continue       # the other kernels do not see x's layout
                            key = _key(kernel, arch, shape, dtype, cfg, call.kernel.cache_key)
                            precision = call.constexprs.get("PRECISION", "ieee")
                            # the launch itself: constexprs (row kernels' tiles), warps, stages
                            key += (f"|{layout}|{precision}|{sorted(call.constexprs.items())}"
                                    f"|{call.num_warps}|{call.num_stages}")
                            if key not in cache:
                                cache[key] = compile_call(call, arch)
                                _save_cache(cache)
                            # a launch may run other warps than its config (fwd_keep on
                            # Hopper: 16); the row and the model take the launch's
                            launched = (cfg if kernel in ROW_KERNELS or
                                        call.num_warps == cfg.num_warps else
                                        dataclasses.replace(cfg, num_warps=call.num_warps))
                            row = dict(kernel=kernel, arch=arch, shape=shape.name, layout=layout,
                                       dtype=str(dtype).replace("torch.", ""),
                                       config=_label(kernel, launched),
                                       default=cfg == default, **cache[key],
                                       smem_limit_kb=info.smem_kb, mma_expected=info.mma,
                                       precision=precision,
                                       model=model(kernel, shape, dtype, cfg))
                            row["model_v2"] = model_v2(kernel, shape, dtype, launched,
                                                       row["regs"], row["smem_bytes"])
                            rows.append(row)
                            if on_row:
                                on_row(row)
    return rows


def _short(dtype: torch.dtype) -> str:
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def _own_dtype(shape: Shape, arch: str) -> torch.dtype:
    """The shape's dtype, or fp16 for bf16 shapes on an arch without bf16 (sm_75)."""
    dt = shape.torch_dtype
    if dt == torch.bfloat16 and "bf16" not in ARCH_INFO[arch].dtypes:
        return torch.float16
    return dt


def check(rows: list[dict]) -> list[str]:
    """What breaks the arch matrix's rules (docs/performance.md, "GPUs") in ``rows``: spills (fp64 excepted: a
    gradcheck-only path), shared memory beyond the arch's per-block limit, a product off the
    arch's tensor-core instruction (16-bit and TF32 products; sm_75 has none in Triton: FMA)."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['shape']} {r.get('layout', 'nchw')} {r['dtype']}"
        if r["dtype"] != "float64" and r["spill_bytes"]:
            bad.append(f"{where}: spills {r['spill_bytes']} B")
        if r["smem_bytes"] > r["smem_limit_kb"] * 1024:
            bad.append(f"{where}: shared memory {r['smem_bytes'] / 1024:.0f} KB > "
                       f"{r['smem_limit_kb']} KB")
        if r["kernel"] in ROW_KERNELS or r["dtype"] == "float64":
            continue
        expected = r["mma_expected"]
        if r["dtype"] == "float32" and r.get("precision") == "ieee" and r["arch"].startswith("sm_"):
            expected = "none"       # IEEE fp32 products run on FMA units on NVIDIA GPUs
        if r["mma"] != expected:
            bad.append(f"{where}: products on {r['mma']} {r.get('mma_sites')}, expected "
                       f"{expected}")
    return bad


def _label(kernel: str, cfg: tuning.Config) -> str:
    if kernel in ("prep", "proj"):
        return f"BR x BD = {triton_impl.ROW_ELEMS} warps={triton_impl.ROW_WARPS}"
    if kernel == "ds_kept":
        return f"BR x BN = {triton_impl.DS_KEPT_ELEMS} warps={triton_impl.DS_KEPT_WARPS}"
    return cfg.label()


def table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | shape | layout | dtype | config | default | regs | spill B | "
             "smem KB (limit) | MMA (sites) | GFLOP | SM GB | HBM MB | model µs (H100) | "
             "model v2 µs (H200) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"]
        sites = ", ".join(f"{k} {v}" for k, v in r.get("mma_sites", {}).items()) or "-"
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['shape']} | {r.get('layout', 'nchw')} | "
            f"{r['dtype']} | {r['config']} | {'yes' if r['default'] else ''} | {r['regs']} | "
            f"{r['spill_bytes']} | {r['smem_bytes'] / 1024:.0f} ({r.get('smem_limit_kb', '?')}) | "
            f"{r['mma']} ({sites}) | {m['flops'] / 1e9:.1f} | {m['sm_bytes'] / 1e9:.3f} | "
            f"{m['hbm_bytes'] / 1e6:.1f} | {m['floor_us']:.1f} | "
            f"{r['model_v2']['time_us']:.1f} |")
    return "\n".join(lines)


def shapes_from(spec: str | None) -> list[Shape]:
    return list(SHAPES.values()) if spec in (None, "", "all") else parse_shapes(spec)

