"""Benchmark shapes, floors, implementations and one measurement routine.

Shared by ``bench/`` (the pytest-benchmark suite), ``python -m csra_triton bench`` and
``bench/gpu_check.sh``, so that every number comes from the same code. Definitions (the results
format of docs/performance.md):

* ``median_ms``: CUDA-event median of ``triton.testing.do_bench`` (which flushes L2 between calls)
  over inputs rotated among several sets; on CPU the median of host-timed calls.
* ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` during one pass minus what was allocated
  before it (the inputs, weights and any compiled state); ``None`` on CPU, where it is not measured.
* ``max_rel_err``: ``||out - ref|| / ||ref||`` against float64 on the same operands; for
  ``fwd+bwd`` the worst of the output, dx and dW.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from .. import fallback, ops
from ..common import mm, rel_err
from ..module import CSRATriton
from ..reference import MHA, as_operand, csra_reference
from .shapes import (CEILINGS, CPU_DEFAULT, HEADLINE, SHAPES, TINY, Shape,  # noqa: F401 - re-exported
                     gpu_tag, parse_shapes, temperatures)

#: The official head eager, compiled, compiled with CUDA graphs (``mode="reduce-overhead"``);
#: CSRATriton eager and under the same two compile modes: every setting compares like with like.
IMPLS = ("eager", "compile", "compile-cg", "triton", "triton-compile", "triton-compile-cg")
PASSES = ("fwd", "fwd+bwd")
COMPILE_MODE = os.environ.get("CSRA_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")

# --------------------------------------------------------------------------- implementations


class Bench:
    """One implementation of one shape on one device, with its inputs."""

    def __init__(self, shape: Shape, impl: str, device: torch.device, n_sets: int | None = None,
                 lam: float = 0.1, seed: int = 0):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.shape, self.impl, self.device, self.lam = shape, impl, device, lam
        dt = shape.torch_dtype
        gen = torch.Generator(device="cpu").manual_seed(seed)
        temps = temperatures(shape.heads)
        # Weight rows like a trained head: kaiming-uniform scale, in the benchmark dtype.
        w = (torch.rand(shape.heads, shape.C, shape.d, generator=gen) * 2 - 1) / math.sqrt(shape.d)
        self.weight0 = w.to(device=device, dtype=dt)
        self.ours = impl.startswith("triton")
        self.graphs = impl.endswith("-cg") and device.type == "cuda"
        if self.ours:
            m = CSRATriton(shape.d, shape.C, shape.heads, lam, temps)
            m.weight.data = self.weight0.clone()
        else:
            m = MHA.from_weight(self.weight0.clone(), temps, lam)
        self.module = m.to(device)
        if "compile" in impl:
            mode = "reduce-overhead" if impl.endswith("-cg") else _compile_mode(device)
            self.fn_module = torch.compile(self.module, mode=mode if device.type == "cuda"
                                           else None)
        else:
            self.fn_module = self.module
        if n_sets is None:  # rotate so that L2 (50-60 MB on H100/H200) cannot hold the inputs
            x_bytes = shape.B * shape.d * shape.N * torch.empty((), dtype=dt).element_size()
            n_sets = 2 if device.type != "cuda" else max(2, min(4, math.ceil(150e6 / x_bytes)))
        self.xs = [torch.randn(shape.B, shape.d, shape.h, shape.w, generator=gen).to(device, dt)
                   for _ in range(n_sets)]
        self.gs = [torch.randn(shape.B, shape.C, generator=gen).to(device, dt)
                   for _ in range(n_sets)]
        self._i = 0

    def weight_grad(self) -> torch.Tensor:
        if self.ours:
            return self.module.weight.grad
        return torch.stack([h.head.weight.grad.view(self.shape.C, self.shape.d)
                            for h in self.module.multi_head])

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def _backend(self):
        # On CPU the 'triton' impl is the vectorised PyTorch fallback, never the interpreter.
        return ops.use_backend("torch" if self.device.type != "cuda" else "auto")

    def step(self, pass_: str) -> Callable[[], None]:
        """The callable that is timed: one pass over the next input set."""
        xs, gs, f = self.xs, self.gs, self.fn_module

        mark = torch.compiler.cudagraph_mark_step_begin if self.graphs else (lambda: None)
        if pass_ == "fwd":
            def run():
                i = self._i = (self._i + 1) % len(xs)
                mark()
                with torch.no_grad(), self._backend():
                    f(xs[i])
        else:
            for x in xs:
                x.requires_grad_(True)

            def run():
                i = self._i = (self._i + 1) % len(xs)
                mark()
                with self._backend():
                    f(xs[i]).backward(gs[i])
                xs[i].grad = None
                self.zero_grad()
        return run

    def max_rel_err(self, pass_: str) -> float:
        """Worst relative error against float64 on the same operands (set 0)."""
        x, g = self.xs[0], self.gs[0]
        x = x.detach().requires_grad_(pass_ != "fwd")
        self.zero_grad()
        with self._backend(), torch.set_grad_enabled(pass_ != "fwd"):
            y = self.fn_module(x)
            if pass_ != "fwd":
                y.backward(g)
        x64 = x.detach().double().requires_grad_(pass_ != "fwd")
        w64 = self.weight0.double().requires_grad_(pass_ != "fwd")
        temps = temperatures(self.shape.heads)
        with torch.set_grad_enabled(pass_ != "fwd"):
            y64 = csra_reference(x64, as_operand(w64, x.dtype), temps, self.lam)
        errs = [rel_err(y, y64)]
        if pass_ != "fwd":
            y64.backward(g.double())
            errs += [rel_err(x.grad, x64.grad), rel_err(self.weight_grad(), w64.grad)]
        self.zero_grad()
        return max(errs)


def _compile_mode(device: torch.device) -> str | None:
    # max-autotune's GEMM search needs a GPU; on CPU the default mode compiles in seconds.
    return COMPILE_MODE if device.type == "cuda" else None


# --------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int = 3,
            reps: int = 10) -> float:
    """Median ms per call: CUDA events via do_bench on GPU (after ``warmup`` untimed calls that
    absorb compilation and autotuning), host clock around synchronised calls on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak bytes allocated during one call beyond what was allocated before it, in MB."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 1e6


def host_us(fn: Callable[[], None], device: torch.device, n: int = 20) -> float:
    """CPU time of the issuing thread per call, ``n`` calls issued back to back with no
    synchronisation inside the timed loop (one after it): what the host spends per call, which
    bounds a step's wall time when the device work is shorter."""
    sync(device)
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    t1 = time.thread_time_ns()
    sync(device)
    return (t1 - t0) / n / 1e3


def device_us(fn: Callable[[], None], device: torch.device, n: int = 5) -> float | None:
    """Sum of the device kernels' times per call (torch.profiler); None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync(device)
    total = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                for e in prof.key_averages())
    return total / n


def measure(shape: Shape, pass_: str, impl: str, device: torch.device, reps: int = 10) -> dict:
    """One results row (docs/performance.md, "Results files"), measured now."""
    bench = Bench(shape, impl, device)
    fn = bench.step(pass_)
    ms = time_ms(fn, device, reps=reps)            # warm-up inside: compile/autotune happen first
    mem = peak_mem_mb(fn, device)
    return _row(shape, pass_, impl, device, ms, mem, bench.max_rel_err(pass_),
                host_us(fn, device), device_us(fn, device))


def _row(shape: Shape, pass_: str, impl: str, device: torch.device, ms: float,
         mem: float | None, err: float, host: float | None = None,
         dev: float | None = None) -> dict:
    row = dict(shape.row_fields(), **{"pass": pass_, "impl": impl, "median_ms": ms,
                                      "peak_mem_mb": mem, "max_rel_err": err,
                                      "host_us": host, "device_us": dev})
    if shape.dtype == "float32" and device.type == "cuda":
        row["tf32"] = dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                           cudnn=torch.backends.cudnn.allow_tf32)
    if device.type != "cuda" and impl.startswith("triton"):
        row["backend"] = "torch-fallback"
    return row


def measure_interleaved(shape: Shape, pass_: str, impls: list[str], device: torch.device,
                        reps: int = 10) -> list[dict]:
    """Rows for several implementations timed in alternation on CPU (one call of each per
    round, ``reps`` rounds): the host's speed drifts over minutes on a shared 2-core machine
    (2x within one run: bench/NOTES.md), which biased ratios of implementations timed one after
    the other. The same rows as :func:`measure`; ``interleaved`` records how."""
    benches = {i: Bench(shape, i, device) for i in impls}
    fns = {i: b.step(pass_) for i, b in benches.items()}
    floor = cpu_gemm(shape, device) if device.type == "cpu" else None
    if floor is not None:
        fns[FLOOR] = floor
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict = {i: [] for i in fns}
    for _ in range(reps):
        for i, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    extra = {}
    if floor is not None:   # the GEMMs of the pass at the rate measured in these rounds
        extra["floor_ms"] = statistics.median(times[FLOOR]) * (1 if pass_ == "fwd" else 4)
    return [dict(_row(shape, pass_, i, device, statistics.median(times[i]), None,
                      b.max_rel_err(pass_), host_us(fns[i], device)), interleaved=list(impls),
                 **extra)
            for i, b in benches.items()]


#: The pseudo-implementation timed beside the others on CPU: one forward-sized GEMM.
FLOOR = "gemm-floor"


def cpu_gemm(shape: Shape, device: torch.device) -> Callable[[], None]:
    """One forward-sized GEMM, (heads*C, d) @ (d, B*N), in the dtype this CPU multiplies the
    shape's inputs fastest (fallback.gemm_dtype) and through the fastest product we know for it
    (common.mm): the CPU floor of a pass is that GEMM's time, once for fwd and four times for
    fwd+bwd (docs/performance.md's count), measured in the same rounds as the implementations."""
    dt = fallback.gemm_dtype(shape.torch_dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    w = torch.randn(shape.heads * shape.C, shape.d, generator=gen).to(device, dt)
    x = torch.randn(shape.d, shape.B * shape.N, generator=gen).to(device, dt)
    out = torch.empty(w.shape[0], x.shape[1], dtype=dt, device=device)

    def run():
        with torch.no_grad():
            mm(w, x, out=out)
    return run


# --------------------------------------------------------------------------- results files


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root or Path(__file__).parent, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_doc(rows: list[dict], device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc = {"device": name, "torch": torch.__version__.split("+")[0],
           "triton": triton.__version__, "commit": git_commit(),
           "date": datetime.date.today().isoformat(), "rows": rows}
    if device.type != "cuda":   # what the fallback's choices followed (fallback.gemm_dtype)
        doc["cpu"] = fallback.cpu_description()
        doc["bf16_gemm"] = str(fallback.gemm_dtype(torch.bfloat16, device)).removeprefix("torch.")
    return doc


def write_results(doc: dict, out_dir: Path, device: torch.device, suffix: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['date']}-{gpu_tag(device)}{'-' + suffix if suffix else ''}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def summary_table(rows: list[dict], gpu: str) -> str:
    """Markdown: per shape and pass, ms per impl, speed-up of triton vs eager and compile,
    % of the floor (floor / triton time), peak MB per impl."""
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["pass"]), {})[r["impl"]] = r
    lines = ["| shape | pass | eager ms | compile ms | triton ms | vs eager | vs compile | "
             "% of floor | peak MB eager / compile / triton | max rel err (triton) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, pass_), impls in by.items():
        def ms(i):
            r = impls.get(i)
            return f"{r['median_ms']:.4f}" if r else "—"

        def mem(i):
            r = impls.get(i)
            return f"{r['peak_mem_mb']:.1f}" if r and r.get("peak_mem_mb") is not None else "—"

        t = impls.get("triton")
        speed = {}
        for base in ("eager", "compile"):
            b = impls.get(base)
            speed[base] = f"{b['median_ms'] / t['median_ms']:.2f}×" if b and t else "—"
        floor = "—"
        if t and t.get("floor_ms"):           # CPU: measured in the run
            floor = f"{100 * t['floor_ms'] / t['median_ms']:.0f}%"
        elif t:
            shape = SHAPES.get(name.split("@")[0])
            if shape is not None:
                shape = dataclasses.replace(shape, **{k: t[k] for k in
                                                      ("B", "d", "h", "w", "C", "heads", "dtype")})
                f = shape.floor_ms(pass_, gpu)
                floor = f"{100 * f / t['median_ms']:.0f}%" if f else "—"
        err = f"{t['max_rel_err']:.1e}" if t else "—"
        lines.append(f"| {name} | {pass_} | {ms('eager')} | {ms('compile')} | {ms('triton')} | "
                     f"{speed['eager']} | {speed['compile']} | {floor} | "
                     f"{mem('eager')} / {mem('compile')} / {mem('triton')} | {err} |")
    return "\n".join(lines)


def host_table(rows: list[dict]) -> str:
    """Markdown: per shape, pass and impl, wall ms, host µs per call (issuing thread) and device
    µs per call (kernel time), and for the compiled CSRATriton rows the ratio to the official
    head under the same compile mode."""
    by = {(r["shape"], r["pass"], r["impl"]): r for r in rows}
    lines = ["| shape | pass | impl | ms | host µs | device µs | vs official, same mode |",
             "|---|---|---|---|---|---|---|"]
    for (name, pass_, impl), r in by.items():
        base = {"triton": "eager", "triton-compile": "compile",
                "triton-compile-cg": "compile-cg"}.get(impl)
        b = by.get((name, pass_, base)) if base else None
        ratio = f"{b['median_ms'] / r['median_ms']:.2f}×" if b else ""

        def fmt(v):
            return "—" if v is None else f"{v:.1f}"
        lines.append(f"| {name} | {pass_} | {impl} | {r['median_ms']:.4f} | "
                     f"{fmt(r.get('host_us'))} | {fmt(r.get('device_us'))} | {ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- end to end


E2E = dict(B=32, size=448, C=80, heads=4, lam=0.1)


def e2e_rows(device: torch.device, budget_s: float | None = None, **over) -> list[dict]:
    """One training step of the official ResNet-101 CSRA model (``models.ResNetCSRA``: a
    torchvision ResNet-101, random init) at 448x448, batch 32, bf16 autocast: forward, BCE loss,
    backward, SGD step. Rows for the official head (its module math, as ``classifier``) and
    CSRATriton, each with the model eager and with ``torch.compile`` of the whole model
    (default mode; compiled rows are skipped once ``budget_s`` is spent), and the head's own
    share: its fwd+bwd on the trunk's features. ``C=9605`` gives the OpenImages step.
    Returns [] where torchvision cannot be imported (the CPU CI)."""
    try:
        from ..models import ResNetCSRA
        ResNetCSRA(1, 0.1, 1, depth=18)
    except ImportError:   # the registry's torchvision does not import with the CPU torch
        return []
    p = dict(E2E, **over)
    B, size, C, heads, lam = p["B"], p["size"], p["C"], p["heads"], p["lam"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(B, 3, size, size, generator=gen).to(device)
    targets = (torch.rand(B, C, generator=gen) < 0.05).float().to(device)
    w0 = ((torch.rand(heads, C, 2048, generator=gen) * 2 - 1) / math.sqrt(2048)).to(device)
    temps = temperatures(heads)
    t0 = time.monotonic()
    rows = []
    for compiled in (False, True):
        for impl in ("eager", "triton"):
            if compiled and budget_s is not None and time.monotonic() - t0 > budget_s:
                rows.append(dict(e2e=True, impl=impl, compiled=True, skipped="time budget"))
                continue
            torch.manual_seed(0)
            model = ResNetCSRA(heads, lam, C, depth=101, temperatures=temps)
            if impl == "triton":
                model.classifier.weight.data = w0.clone()
            else:
                model.classifier = MHA.from_weight(w0.clone(), temps, lam)
            model = model.to(device)
            trunk, head = model.backbone, model.classifier
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            fn = torch.compile(model) if compiled else model

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = fn(images)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(),
                                                                            targets)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = time_ms(step, device, warmup=3, reps=3)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                feats = trunk(images[:B]).detach()
            feats.requires_grad_(True)
            g = torch.randn(B, C, generator=gen).to(device, feats.dtype)

            def head_step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y = head(feats)
                y.backward(g.to(y.dtype))
                feats.grad = None
                head.zero_grad(set_to_none=True)

            head_ms = time_ms(head_step, device, warmup=3, reps=3)
            rows.append(dict(e2e=True, impl=impl, compiled=compiled, B=B, size=size, C=C,
                             heads=heads, dtype="bfloat16 autocast", step_ms=ms,
                             head_ms=head_ms, head_share=head_ms / ms,
                             peak_mem_mb=peak_mem_mb(step, device)))
            del model, opt, fn, trunk, head, feats
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def e2e_table(rows: list[dict]) -> str:
    lines = ["| e2e step (ResNet-101, 448, B=32, bf16 autocast) | head | step ms | head fwd+bwd ms "
             "| head share | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        mode = "torch.compile(model)" if r["compiled"] else "eager model"
        if "skipped" in r:
            lines.append(f"| {mode} | {r['impl']} | skipped ({r['skipped']}) | | | |")
            continue
        head = "official (eager math)" if r["impl"] == "eager" else "CSRATriton"
        lines.append(f"| {mode} | {head} | {r['step_ms']:.2f} | {r['head_ms']:.3f} | "
                     f"{100 * r['head_share']:.1f}% | {r['peak_mem_mb'] or 0:.0f} |")
    return "\n".join(lines)
