"""Deployment rows of ``python -m csra_triton bench --deploy``: the official head and CSRATriton
exported the same way, side by side, with their errors against float64.

* ``onnxruntime``: ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch, run in an
  onnxruntime session (the CPU execution provider; the CUDA one where a GPU and
  onnxruntime-gpu are present);
* ``aoti``: ``torch.export`` then AOTInductor (``aoti_compile_and_package``), loaded and run
  in this process.

Both heads of a shape and runtime are timed in alternating rounds (a shared machine's speed
drifts within seconds): each round times ``reps`` calls of one, then of the other; a row's
``median_ms`` is the median over its rounds, and ``vs_official`` the median over rounds of the
in-round ratio official / ours. The shapes are the benchmark's (``shapes.py``) at serving batch
sizes; ``DEPLOY_DEFAULT`` lists the issue's set.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .. import ops
from ..common import rel_err
from ..module import CSRATriton
from ..reference import MHA, csra_reference
from .shapes import Shape, temperatures

#: Serving shapes: the headline at B=1 and 2, the latency shape, OpenImages' 9,605 classes at
#: B=1 with 1 and 4 heads; fp32 (what a CPU serves).
DEPLOY_DEFAULT = ("coco-r101-448@B=1@dtype=float32,coco-r101-448@B=2@dtype=float32,"
                  "latency-r101-224@dtype=float32,"
                  "openimages-r101-448@B=1@heads=1@dtype=float32,"
                  "openimages-r101-448@B=1@dtype=float32")
RUNTIMES = ("onnxruntime", "aoti")


def heads(shape: Shape, lam: float = 0.1, seed: int = 0) -> tuple:
    """(official, ours, x): the official head and CSRATriton holding the same weight, and an
    input, for ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    temps = temperatures(shape.heads)
    w = (torch.rand(shape.heads, shape.C, shape.d, generator=gen) * 2 - 1) / math.sqrt(shape.d)
    w = w.to(shape.torch_dtype)
    official = MHA.from_weight(w, [99 if math.isinf(t) else t for t in temps], lam).eval()
    ours = CSRATriton(shape.d, shape.C, shape.heads, lam, temps).to(shape.torch_dtype).eval()
    ours.weight.data = w.clone()
    x = torch.randn(shape.B, shape.d, shape.h, shape.w, generator=gen).to(shape.torch_dtype)
    return official, ours, x


def _providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return ([p for p in ("CUDAExecutionProvider",) if p in have and torch.cuda.is_available()]
            + ["CPUExecutionProvider"])


def onnx_runner(module: torch.nn.Module, x: torch.Tensor, folder: Path,
                name: str, threads: int | None = None) -> Callable:
    """``module`` exported to ONNX (dynamic batch) and loaded in onnxruntime: a function of a
    NumPy input returning a NumPy output."""
    import onnxruntime as ort

    path = folder / f"{name}.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad(), ops.use_backend("torch"):
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                    verbose=False)
    program.save(str(path))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # no busy-waiting between runs: two sessions timed in alternation would otherwise take
    # cores from each other (a session's idle threads spin after each run)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=_providers())
    input_name = session.get_inputs()[0].name
    return lambda a: session.run(None, {input_name: a})[0]


def aoti_runner(module: torch.nn.Module, x: torch.Tensor, folder: Path, name: str) -> Callable:
    """``module`` through torch.export and AOTInductor, loaded here: a function of a tensor
    (a dynamic batch from 2 up; at x's batch where that is 1, which torch.export specialises)."""
    dynamic = ({0: torch.export.Dim("batch", min=2, max=1024)},) if x.shape[0] > 1 else None
    with torch.no_grad(), ops.use_backend("torch"):
        ep = torch.export.export(module, (x,), dynamic_shapes=dynamic)
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(folder / f"{name}.pt2"))
    runner = torch._inductor.aoti_load_package(path)

    def run(a):
        with torch.no_grad():
            return runner(a)
    return run


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 7, reps: int = 10
              ) -> dict[str, list[float]]:
    """ms per call of each function, one list per function: ``rounds`` rounds, each timing
    ``reps`` calls of every function in turn (after two untimed calls each)."""
    for fn in fns.values():
        fn()
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t0) * 1e3 / reps)
    return times


def rows(shape: Shape, runtimes=RUNTIMES, rounds: int = 7, reps: int | None = None,
         threads: int | None = None) -> list[dict]:
    """The deployment rows of ``shape``: per runtime, the official head's and ours."""
    official, ours, x = heads(shape)
    w64 = ours.weight.detach().double()
    y64 = csra_reference(x.double(), w64, ours.temperatures, ours.lam)
    if reps is None:          # about 0.2 s a round per head
        flops = 2 * shape.B * shape.heads * shape.C * shape.d * shape.N
        reps = max(1, min(50, round(2e10 / max(flops, 1))))
    out = []
    with tempfile.TemporaryDirectory(prefix="csra-deploy-") as tmp:
        folder = Path(tmp)
        for runtime in runtimes:
            if runtime == "onnxruntime":
                run = {k: onnx_runner(m, x, folder, k, threads)
                       for k, m in (("official", official), ("ours", ours))}
                arg = x.numpy()
                got = {k: torch.from_numpy(f(arg)) for k, f in run.items()}
                fns = {k: (lambda f=f: f(arg)) for k, f in run.items()}
            elif runtime == "aoti":
                run = {k: aoti_runner(m, x, folder, k)
                       for k, m in (("official", official), ("ours", ours))}
                got = {k: f(x) for k, f in run.items()}
                fns = {k: (lambda f=f: f(x)) for k, f in run.items()}
            else:
                raise ValueError(f"runtime: expected some of {RUNTIMES}, got {runtime!r}")
            times = alternate(fns, rounds, reps)
            ratios = [o / t for o, t in zip(times["official"], times["ours"])]
            for k in ("official", "ours"):
                out.append(dict(shape.row_fields(), **{
                    "pass": "fwd", "impl": f"{'eager' if k == 'official' else 'triton'}-{runtime}",
                    "runtime": runtime, "median_ms": statistics.median(times[k]),
                    "rounds_ms": times[k], "max_rel_err": rel_err(got[k], y64),
                    "vs_official": statistics.median(ratios) if k == "ours" else None}))
    return out


def table(rows_: list[dict]) -> str:
    """Markdown: per shape and runtime, both heads' ms, ours vs official, errors."""
    by: dict = {}
    for r in rows_:
        by.setdefault((r["shape"], r["runtime"]), {})[r["impl"].split("-")[0]] = r
    lines = ["| shape | runtime | official ms | ours ms | ours vs official | err official | "
             "err ours |", "|---|---|---|---|---|---|---|"]
    for (name, runtime), r in by.items():
        o, t = r.get("eager"), r.get("triton")
        if not (o and t):
            continue
        lines.append(f"| {name} | {runtime} | {o['median_ms']:.3f} | {t['median_ms']:.3f} | "
                     f"{t['vs_official']:.2f}× | {o['max_rel_err']:.1e} | "
                     f"{t['max_rel_err']:.1e} |")
    return "\n".join(lines)
