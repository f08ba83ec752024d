"""Command line (the tools layer, docs/architecture.md).

``python -m csra_triton`` (or ``python -m csra_triton verify``) prints a verification table: for
each dtype, the max relative error of the forward, dx and dW against a float64 computation, and the
time per call. On CUDA it uses the headline shape; without CUDA the Triton kernels run in the
interpreter at a reduced shape (and the PyTorch fallback is shown beside them).

``python -m csra_triton bench [--shapes NAMES] [--pass fwd,fwd+bwd] [--out DIR] [--plot]`` times
eager, torch.compile and csra-triton on the benchmark shapes (``csra_triton/tools/shapes.py``),
prints a markdown table and writes the results JSON. On CPU it times the PyTorch fallback against
eager, labelled as CPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import benchmark as bm
from .progress import progress
from .. import fallback, ops
from ..module import csra
from ..reference import as_operand, csra_reference

CPU_SHAPE = dict(B=2, d=256, h=7, w=7, C=80, heads=4)       # reduced, for the interpreter


def verify_rows(shape: dict, dtypes, device: torch.device, backends, reps: int = 3,
                lam: float = 0.1):
    """One row per (backend, dtype): errors of y, dx, dW against float64, and ms per call."""
    B, d, h, w, C, H = (shape[k] for k in ("B", "d", "h", "w", "C", "heads"))
    temps = bm.temperatures(H)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(B, d, h, w, generator=gen).to(device)
    w0 = (torch.rand(H, C, d, generator=gen) * 2 - 1).div(d ** 0.5).to(device)
    g0 = torch.randn(B, C, generator=gen).to(device)
    rows = []
    for dtype in dtypes:
        # float64 on the operands the kernels multiply: x and the weight rounded to ``dtype``.
        x64 = x0.to(dtype).double().requires_grad_()
        w64 = w0.double().requires_grad_()
        y64 = csra_reference(x64, as_operand(w64, dtype), temps, lam)
        y64.backward(g0.double())
        for backend in backends:
            with ops.use_backend(backend):
                x = x0.to(dtype).clone().requires_grad_()
                wt = w0.clone().requires_grad_()
                y = csra(x, wt, temps, lam)
                y.backward(g0.to(dtype))
                row = dict(backend=backend, dtype=str(dtype).replace("torch.", ""),
                           fwd_err=bm.rel_err(y, y64), dx_err=bm.rel_err(x.grad, x64.grad),
                           dw_err=bm.rel_err(wt.grad, w64.grad))
                xi = x.detach()
                # warm-up calls: the interpreter's first is enough; oneDNN's first bf16 calls
                # on the CPU are many times its steady state, which is what a row reports
                warmup = 1 if backend == "triton" else 5
                with torch.no_grad():
                    row["fwd_ms"] = bm.time_ms(lambda: csra(xi, wt, temps, lam), device,
                                               warmup=warmup, reps=reps)

                def step():
                    csra(x, wt, temps, lam).backward(g0.to(dtype))

                row["fwd_bwd_ms"] = bm.time_ms(step, device, warmup=warmup, reps=reps)
            rows.append(row)
    return rows


def _verify(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = bm.SHAPES[bm.HEADLINE]
    shape = (dict(B=head.B, d=head.d, h=head.h, w=head.w, C=head.C, heads=head.heads)
             if device.type == "cuda" else dict(CPU_SHAPE))
    for k in shape:
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if device.type == "cuda":
        backends, where = ["triton"], f"CUDA ({torch.cuda.get_device_name()})"
    else:
        backends = ["triton", "torch"]
        where = ("CPU, no CUDA: 'triton' = the same Triton kernels in TRITON_INTERPRET mode at a "
                 "reduced shape (times are the interpreter's, not a GPU's); 'torch' = the "
                 "vectorised PyTorch fallback used on CPU")
    print(f"csra-triton verification on {where}")
    print("shape: " + ", ".join(f"{k}={v}" for k, v in shape.items())
          + f" (N={shape['h'] * shape['w']}), official temperatures, lam=0.1")
    print("errors: ||out - ref|| / ||ref|| against float64 on the same operands (x and weight "
          "rounded to the dtype); tolerance fp32 1e-5, fp16/bf16 2e-2\n")
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    if tf32:
        print("fp32 runs on TF32 tensor cores (torch.backends.cudnn.allow_tf32 is True, as for "
              "the official conv): tolerance 5e-3\n")
    rows = verify_rows(shape, dtypes, device, backends, reps=args.reps)
    head = "| backend | dtype | fwd err | dx err | dW err | fwd ms | fwd+bwd ms | ok |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    bad = 0
    for r in rows:
        tol = 1e-5 if r["dtype"] in ("float32", "float64") else 2e-2
        if r["dtype"] == "float32" and tf32:
            tol = 5e-3   # TF32 products (10 mantissa bits), as the official conv computes them
        ok = max(r["fwd_err"], r["dx_err"], r["dw_err"]) <= tol
        bad += not ok
        print(f"| {r['backend']} | {r['dtype']} | {r['fwd_err']:.2e} | {r['dx_err']:.2e} | "
              f"{r['dw_err']:.2e} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{'yes' if ok else 'NO'} |")
    return 1 if bad else 0


def _bench(args) -> int:
    from pathlib import Path

    if args.host:
        return _bench_host(args)
    if args.deploy:
        return _bench_deploy(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = bm.gpu_tag(device)
    shapes = bm.parse_shapes(args.shapes or ("all" if device.type == "cuda" else bm.CPU_DEFAULT))
    passes = [p for p in args.passes.split(",") if p]
    for p in passes:
        if p not in bm.PASSES:
            raise SystemExit(f"--pass: expected fwd and/or fwd+bwd, got {p!r}")
    impls = args.impls.split(",") if args.impls else (
        list(bm.IMPLS) if device.type == "cuda" else ["eager", "compile", "triton"])
    if device.type == "cuda":
        print(f"csra-triton bench on {torch.cuda.get_device_name()} ({gpu}), torch "
              f"{torch.__version__}, compile mode {bm.COMPILE_MODE!r}")
    else:
        print("csra-triton bench on CPU: no CUDA. 'triton' rows time the vectorised PyTorch "
              "fallback (what CPU tensors run), against the official head eager and under "
              "torch.compile, all timed in alternation with one forward-sized GEMM (the floor: "
              "x1 fwd, x4 fwd+bwd). These are CPU numbers; Triton kernel timings need CUDA. "
              "Peak memory is measured on CUDA only.")
        print(f"CPU: {fallback.cpu_description()}; the fallback's GEMMs for bf16 inputs: "
              f"{fallback.gemm_dtype(torch.bfloat16, device)}")
    t0 = time.monotonic()
    rows, skipped, failed = [], [], []
    # On CUDA every eager and triton row first, then the compile rows (their compilation and
    # autotuning is what a time budget may cut), headline first. On CPU every implementation of
    # a shape and pass is timed in alternation (benchmark.measure_interleaved) with the GEMM
    # floor, so that the host's drift does not bias their ratios.
    for i in impls:
        if i not in bm.IMPLS:
            raise SystemExit(f"--impls: expected some of {', '.join(bm.IMPLS)}, got {i!r}")
    plain = [i for i in impls if "compile" not in i]
    compiled = [i for i in impls if "compile" in i]
    if device.type != "cuda":   # every implementation of a shape and pass in alternation
        plain, compiled = list(impls), []
    groups = [plain] if device.type != "cuda" else [[i] for i in plain]
    runs = [(s, p, g) for s in shapes for p in passes for g in groups]
    runs += [(s, p, [c]) for c in compiled for s in shapes for p in passes]
    for shape, pass_, group in progress(runs, "bench", unit="run"):
        if group[0] in compiled and args.budget_s and time.monotonic() - t0 > args.budget_s:
            skipped.append(f"{shape.name} {pass_} {group[0]}")
            continue
        try:
            new_rows = (bm.measure_interleaved(shape, pass_, group, device, args.reps)
                        if len(group) > 1 or device.type != "cuda" else
                        [bm.measure(shape, pass_, group[0], device, reps=args.reps)])
        except Exception as exc:  # one failed run must not lose the others' results
            failed.append(f"{shape.name} {pass_} {'+'.join(group)}: "
                          f"{type(exc).__name__}: {exc}"[:500])
            print(f"  {shape.name:28s} {pass_:8s} {'+'.join(group):8s} FAILED {failed[-1]}",
                  flush=True)
            continue
        for row in new_rows:
            rows.append(row)
            host = row.get("host_us")
            dev = row.get("device_us")
            print(f"  {shape.name:28s} {pass_:8s} {row['impl']:17s} {row['median_ms']:10.4f} ms  "
                  f"host {host if host is None else round(host, 1)} µs  device "
                  f"{dev if dev is None else round(dev, 1)} µs  err {row['max_rel_err']:.1e}"
                  + (f"  floor {row['floor_ms']:.2f} ms" if row.get("floor_ms") else ""),
                  flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    e2e = []
    if args.e2e:
        if device.type != "cuda":
            print("--e2e: needs CUDA (a ResNet-101 training step at 448x448); skipped")
        else:
            left = (None if args.budget_s is None
                    else max(0.0, args.budget_s - (time.monotonic() - t0)))
            for c in (int(v) for v in args.e2e_classes.split(",") if v):
                e2e += bm.e2e_rows(device, budget_s=left, C=c)
            if not e2e:
                print("--e2e: torchvision cannot be imported here; skipped")
    doc = bm.results_doc(rows, device)
    if e2e:
        doc["e2e"] = e2e
    if skipped:
        doc["skipped"] = {"reason": f"time budget of {args.budget_s} s spent", "runs": skipped}
    if failed:
        doc["failed"] = failed
    path = bm.write_results(doc, Path(args.out), device)
    if args.plot:
        for p in _plots(device, impls, Path(args.out), args.reps):
            print(f"plot: {p}")
    print(f"\nresults: {path}")
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)}")
    print(("CPU numbers, not GPU: " if device.type != "cuda" else "")
          + f"{doc['device']}{' (' + doc['cpu'] + ')' if 'cpu' in doc else ''}, {doc['date']}, "
          f"commit {doc['commit'][:12]}")
    print(bm.summary_table(rows, gpu))
    print()
    print(bm.host_table(rows))
    if e2e:
        print(bm.e2e_table(e2e))
    if failed:
        print(f"FAILED runs: {len(failed)} (see 'failed' in {path})")
    return 1 if failed else 0


def _plots(device, impls, out_dir, reps):
    """time vs batch (headline, fwd) and, on CUDA, peak memory vs classes (fwd+bwd)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'csra-triton[plot]'")
        return []
    import dataclasses

    head = bm.SHAPES[bm.HEADLINE]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    batches = [1, 2, 4, 8, 16, 32, 64] if device.type == "cuda" else [1, 2, 4]
    def line_plot(xs, series, xlabel, ylabel, title, name):
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, ys in series.items():
            ax.plot(xs, ys, marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend()
        path = out_dir / f"{name}-{bm.gpu_tag(device)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    times = {impl: [bm.measure(dataclasses.replace(head, B=b), "fwd", impl, device,
                               reps)["median_ms"] for b in batches] for impl in impls}
    paths = [line_plot(batches, times, "batch size", "ms (median)",
                       f"{bm.HEADLINE} forward vs batch — {where}", "time_vs_batch")]
    if device.type != "cuda":
        print("peak memory vs classes: measured on CUDA only; skipped on CPU")
        return paths
    classes = [80, 320, 1280, 4800, 9605]
    mems = {impl: [bm.measure(dataclasses.replace(head, B=32, C=c), "fwd+bwd", impl, device,
                              reps=3)["peak_mem_mb"] for c in classes] for impl in impls}
    paths.append(line_plot(classes, mems, "classes", "peak MB beyond inputs",
                           f"fwd+bwd peak memory, B=32, 14x14, d=2048 — {where}",
                           "mem_vs_classes"))
    return paths


def _maps(args) -> int:
    from pathlib import Path

    from . import demo, viz

    torch.manual_seed(args.seed)
    if args.checkpoint and Path(args.checkpoint).exists():
        saved = torch.load(args.checkpoint, map_location="cpu")
        model = demo.Classifier("csra", heads=saved["heads"], lam=saved["lam"])
        model.load_state_dict(saved["state_dict"])
        print(f"loaded {args.checkpoint}")
    else:
        model = demo.Classifier("csra", heads=args.heads, lam=args.lam)
        print(f"training the example model on {args.train} synthetic images, {args.epochs} epochs "
              f"(CSRA heads={args.heads}, lam={args.lam})")
        demo.train(model, demo.make_shapes(args.train, seed=args.seed), epochs=args.epochs,
                   seed=args.seed)
        if args.checkpoint:
            torch.save({"state_dict": model.state_dict(), "heads": args.heads, "lam": args.lam},
                       args.checkpoint)
            print(f"saved {args.checkpoint}")
    model.eval()
    held_out = demo.make_shapes(max(args.images, 200), seed=args.seed + 1)
    with torch.no_grad(), demo.cpu_backend(held_out.images):
        feats = model.trunk(held_out.images)
        logits = model.head(feats)
        amaps = model.head.attention_maps(feats)               # (B, H, C, h, w)
    k = args.head
    if not 0 <= k < model.head.heads:
        raise SystemExit(f"--head: expected 0..{model.head.heads - 1}, got {k}")
    ratio = demo.in_box_ratio(amaps[:, k], held_out)
    print(f"held-out mAP {demo.evaluate(model, held_out):.2f}%; head {k} (T="
          f"{model.head.temperatures[k]:g}): attention mass inside the true shape's box is "
          f"{ratio:.2f}x its area share (1.0 = no localisation), over {len(held_out.images)} "
          "images")
    n = args.images
    truth = [[demo.CLASSES[c] for c, *_ in b] for b in held_out.boxes[:n]]
    path = viz.topk_grid(held_out.images[:n], logits[:n], amaps[:n, k], demo.CLASSES, args.out,
                         k=args.topk, truth=truth,
                         title=f"CSRA head {k} attention (T={model.head.temperatures[k]:g}) "
                               f"for the top-{args.topk} predicted classes")
    print(f"wrote {path}")
    return 0


def _bench_deploy(args) -> int:
    """``bench --deploy``: the official head and CSRATriton exported the same way (ONNX in
    onnxruntime, AOTInductor), timed in alternation, with errors against float64."""
    from pathlib import Path

    from . import deploy

    device = torch.device("cpu")
    shapes = bm.parse_shapes(args.shapes or deploy.DEPLOY_DEFAULT)
    runtimes = [r for r in args.runtimes.split(",") if r]
    for r in runtimes:
        if r not in deploy.RUNTIMES:
            raise SystemExit(f"--runtimes: expected some of {', '.join(deploy.RUNTIMES)}, "
                             f"got {r!r}")
    print(f"csra-triton deployment rows: the official head and CSRATriton exported alike, "
          f"timed in alternation ({torch.get_num_threads()} threads; onnxruntime providers "
          f"{', '.join(deploy._providers())})")
    rows, failed = [], []
    for shape in progress(shapes, "deploy"):
        try:
            new = deploy.rows(shape, runtimes, rounds=args.rounds,
                              threads=torch.get_num_threads())
            rows += new
            print("\n".join(deploy.table(new).splitlines()[2:]), flush=True)
        except Exception as exc:  # one failed run must not lose the others' results
            failed.append(f"{shape.name}: {type(exc).__name__}: {exc}"[:500])
            print(f"  {shape.name} FAILED {failed[-1]}", flush=True)
    print("\n" + deploy.table(rows))
    doc = bm.results_doc(rows, device)
    doc["deploy"] = True
    if failed:
        doc["failed"] = failed
    path = bm.write_results(doc, Path(args.out), device, suffix="deploy")
    print(f"\nresults: {path}")
    return 1 if failed else 0


def _bench_host(args) -> int:
    from . import hostpath

    shapes = bm.parse_shapes(args.shapes or "coco-r101-448,latency-r101-224")
    layouts = [v for v in args.layouts.split(",") if v]
    for v in layouts:
        if v not in ("nchw", "channels_last", "tokens"):
            raise SystemExit(f"--layouts: expected some of nchw, channels_last, tokens, got {v!r}")
    print("host path: the op's GPU path on small CPU tensors (real H, C, D; B=2, N=4) with "
          "every Triton launch stubbed; launches = Triton + outermost ATen kernels; host µs = "
          "median per call on this CPU (ATen's small CPU kernels included)")
    print(hostpath.table(hostpath.report(shapes, layouts, reps=args.reps)))
    print("\nhost µs against the floors (one thread, ours with launches stubbed, in alternation): "
          "the bare autograd.Function allocating the same outputs and saved state and doing the "
          "same ATen work in its backward; the official eager head computing for real")
    print(hostpath.ratio_table(hostpath.ratios(shapes, layouts, reps=max(args.reps, 5))))
    return 0


def _tune(args) -> int:
    from .. import triton_impl as ti
    from .. import tuning
    from ..common import acc_dtype, empty, fwd_outputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = bm.parse_shapes(args.shapes or "coco-r101-448,latency-r101-224")
    kernels = (list(tuning.KERNELS) if args.kernel == "all"
               else [tuning.FORMER_NAMES.get(args.kernel, args.kernel)])
    if device.type != "cuda":
        print("tune: sweeps need CUDA (without a GPU exactly one config, the default, is used). "
              "The pruned config spaces:")
        for shape in shapes:
            size = shape.torch_dtype.itemsize
            n = len(tuning.config_space("fwd", shape.heads, shape.C, shape.d, shape.N, size))
            d = tuning.default_config(shape.heads, shape.C, shape.d, shape.N, size)
            print(f"  {shape.name}: {n} forward configs, 6 backward (warps x stages for the "
                  f"forward's tiles); default {d.label()}")
        return 0
    from ..archs import device_arch

    arch = device_arch(device)
    env = tuning.environment(device, arch)
    print(f"tuning on {env['gpu']}, torch {env['torch']}, triton {env['triton']}; cache "
          f"{tuning.cache_path()}")
    for shape in progress(shapes, "tune", unit="shape"):
        b = bm.Bench(shape, "triton", device, n_sets=1)
        x3, w = b.xs[0].flatten(2), b.weight0
        H, C, D, N, B = shape.heads, shape.C, shape.d, shape.N, shape.B
        size = x3.element_size()
        params = ti.params_tensor(bm.temperatures(H), 0.1, acc_dtype(x3.dtype), device)
        outs = fwd_outputs(x3, H, C, empty)
        w_op, inv_n = ti.prep_weight(x3, w, True, outs[5])
        fwd_best = tuning.default_config(H, C, D, N, size, arch)
        for kernel in kernels:
            if kernel == "fwd":
                space = tuning.config_space("fwd", H, C, D, N, size, arch=arch)
                bench = ti.fwd_bench(x3, w, params, outs)
            else:
                ti.fwd_call(x3, w_op, inv_n, params, outs, fwd_best, H).run()
                chunk = ti.ds_chunk_classes(H, C, B, N, fwd_best.BC)
                ws = torch.empty(H * chunk * B * N, dtype=x3.dtype, device=device)
                space = tuning.config_space("ds", H, C, D, N, size, fwd_best.tiles(), arch)
                bench = ti.ds_bench(x3, w_op, inv_n, params, b.gs[0], outs[1:5], chunk, ws)
            space, known = tuning.drop_known_spills(space, kernel, shape, x3.dtype, arch,
                                                    ti.kernel_source(kernel))
            rejected = [(c, "spills (compile report cache)") for c in known]
            results = tuning.sweep(space, bench, args.budget_s, rejected)
            default_ms = next((ms for c, ms in results if c == space[0]), float("nan"))
            best, best_ms = results[0]
            print(f"\n{shape.name} {kernel}: {len(results)} of {len(space) + len(known)} configs "
                  f"timed; best {best_ms:.4f} ms vs default {default_ms:.4f} ms "
                  f"({default_ms / best_ms:.2f}x); {len(rejected)} rejected")
            print("| config | median ms |\n|---|---|")
            for cfg, ms in results:
                print(f"| {cfg.label()}{' (default)' if cfg == space[0] else ''} | {ms:.4f} |")
            for cfg, why in rejected:
                print(f"| {cfg.label()} | rejected: {why} |")
            key = tuning.make_key(kernel, H, C, D, N, x3.dtype)
            tuning.save_choice(key, best, best_ms, env)
            if kernel == "fwd":
                fwd_best = best
    print(f"\nwrote {tuning.cache_path()}")
    return 0


def _inspect(args) -> int:
    import json
    import os
    import subprocess

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels are interpreter functions in this process: compile in a fresh one.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "csra_triton", *args.argv], env=env).returncode
    from . import compiled

    archs = [a for a in args.arch.split(",") if a]
    if archs == ["all"]:
        archs = list(compiled.ARCHS)
    for a in archs:
        if a not in compiled.ARCHS:
            raise SystemExit(f"--arch: expected 'all' or some of {', '.join(compiled.ARCHS)}, "
                             f"got {a!r}")
    layouts = [v for v in args.layouts.split(",") if v]
    for v in layouts:
        if v not in compiled.LAYOUTS:
            raise SystemExit(f"--layouts: expected some of {', '.join(compiled.LAYOUTS)}, "
                             f"got {v!r}")
    dtypes = None
    if args.dtypes:
        try:
            dtypes = [compiled.DTYPES[d] for d in args.dtypes.split(",") if d]
        except KeyError as exc:
            raise SystemExit(f"--dtypes: expected some of {', '.join(compiled.DTYPES)}, "
                             f"got {exc.args[0]!r}") from None
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k not in compiled.KERNELS:
            raise SystemExit(f"--kernels: expected some of {', '.join(compiled.KERNELS)}, "
                             f"got {k!r}")
    shapes = compiled.shapes_from(args.shapes)
    print(f"compile report: triton {compiled._triton_version()}, targets {', '.join(archs)} "
          f"(compiled here, no GPU needed); model rates (H100): "
          + ", ".join(f"{k} {v / 1e12:g}T" for k, v in compiled.RATES.items()), flush=True)
    rows = compiled.report(shapes, archs, dtypes, args.all_configs, kernels, layouts=layouts)
    print(compiled.table(rows))
    bad = compiled.check([r for r in rows if r["default"]])
    print(f"\ndefault configs: {len(bad)} rule(s) broken (0 spills, shared memory within the "
          f"arch's limit, every product on the arch's tensor cores)")
    for b in bad:
        print("  " + b)
    if args.json:
        doc = {"triton": compiled._triton_version(), "rates": compiled.RATES, "rows": rows,
               "broken": bad}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _workflow_parsers(sub) -> None:
    """``predict``, ``val`` and ``train`` (tools/workflow.py): the official scripts' workflow."""
    import math

    from . import data, workflow

    def count(low):
        """An argparse type: an integer of at least ``low``, else an error naming the value."""
        def parse(text):
            try:
                v = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
            if v < low:
                raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
            return v
        return parse

    def number(low, high=math.inf, open_low=False):
        """An argparse type: a finite number in [low, high] (``open_low``: above low)."""
        def parse(text):
            try:
                v = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
            if not (math.isfinite(v) and (v > low if open_low else v >= low) and v <= high):
                bound = f"{'>' if open_low else '>='} {low}" + (
                    f" and <= {high}" if high != math.inf else "")
                raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
            return v
        return parse

    def scale_option(p, default_text):
        p.add_argument("--scale", choices=data.SCALES, default=None,
                       help=f"pixels in [0, 1] (unit) or [-1, 1] (half); default: "
                            f"{default_text}")

    def data_options(p):
        p.add_argument("--dataset", choices=("voc07", "coco", "wider"), default=None,
                       help="an official annotation JSON's dataset (its targets' codes and "
                            "class names)")
        p.add_argument("--names", default=None,
                       help="class names, one per line (CSV data; or to name the classes)")
        p.add_argument("--images", dest="images_dir", default=None,
                       help="COCO instances: the image folder")
        p.add_argument("--image-root", default=None,
                       help="where relative image paths start (default: the annotation file's "
                            "folder)")
        p.add_argument("--workers", type=count(0), default=0, help="DataLoader workers")

    def model_options(p, scale_default):
        p.add_argument("--lam", type=number(-math.inf), default=None,
                       help="lam (default: the checkpoint's, or the family's official value)")
        p.add_argument("--img-size", type=count(1), default=None,
                       help="input size (default: the checkpoint's, 448 ResNet, 224 ViT)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                                                      "there is one)")
        p.add_argument("--batch", type=count(1), default=16)
        scale_option(p, scale_default)

    p = sub.add_parser("predict", help="classes (and attention maps) of images, from a "
                                       "checkpoint (the official demo.py)")
    p.add_argument("checkpoint", help="a checkpoint `train` wrote, or an official one")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--threshold", type=number(0.0, 1.0), default=0.5,
                   help="classes with a sigmoid score above this are listed (demo.py's 0.5)")
    p.add_argument("--maps", default=None,
                   help="a folder: each image's head-0 attention for its top-3 classes (PNG)")
    p.add_argument("--json", default=None, help="also write the predictions to this JSON file")
    data_options(p)
    model_options(p, "the checkpoint's, else as the official demo.py: [-1, 1] for ViTs")

    v = sub.add_parser("val", help="the official metrics of a checkpoint on a dataset (the "
                                   "official val.py): mAP, CP/CR/CF1, OP/OR/OF1, per-class AP")
    v.add_argument("checkpoint", help="a checkpoint `train` wrote, or an official one")
    v.add_argument("data", help="an official annotation JSON (with --dataset), COCO's "
                                "instances JSON (with --images), a VOC folder, or a CSV of "
                                "path,label;label (with --names)")
    v.add_argument("--split", default="test", help="a VOC folder's split (ImageSets/Main)")
    v.add_argument("--json", default=None, help="write the report (JSON) here")
    data_options(v)
    model_options(v, "the checkpoint's, else as the official val.py: [-1, 1] on WIDER")

    t = sub.add_parser("train", help="train with the official recipe (main.py) on our head; "
                                     "without --train, on synthetic shapes")
    t.add_argument("--train", default=None,
                   help="training data, as val reads it (a VOC folder's trainval split)")
    t.add_argument("--val", default=None, help="held-out data, evaluated every epoch")
    t.add_argument("--val-images", default=None, help="COCO: the held-out image folder")
    t.add_argument("--model", choices=workflow.MODELS, default=None,
                   help="resnet101 with --train, synthetic without")
    t.add_argument("--pretrained", default="auto",
                   help="the backbone's weights: 'auto' (the official models' ImageNet weights: "
                        "torchvision's for ResNets, timm's for ViTs), 'torchvision', 'timm', "
                        "'none' (random) or a state-dict file")
    t.add_argument("--heads", type=count(1), default=1)
    t.add_argument("--lam", type=number(-math.inf), default=0.1)
    t.add_argument("--img-size", type=count(1), default=None)
    t.add_argument("--epochs", type=count(1), default=30)
    t.add_argument("--batch", type=count(1), default=16,
                   help="the global batch (split over torchrun's ranks)")
    t.add_argument("--lr", type=number(0.0, open_low=True), default=0.01,
                   help="the backbone's learning rate")
    t.add_argument("--head-lr-mult", type=number(0.0), default=10.0,
                   help="the classifier's learning rate, in multiples of --lr")
    t.add_argument("--momentum", type=number(0.0, 1.0), default=0.9)
    t.add_argument("--weight-decay", type=number(0.0), default=1e-4)
    t.add_argument("--warmup", type=count(0), default=2,
                   help="epochs of linear warm-up, per step")
    t.add_argument("--step", type=count(1), default=None,
                   help="epochs between x gamma learning-rate steps (default: the official 4 "
                        "on VOC, 5 on other data)")
    t.add_argument("--gamma", type=number(0.0, 1.0, open_low=True), default=0.1)
    t.add_argument("--aug", choices=data.AUGMENTATIONS, default=None,
                   help="training augmentation (default: the official flip+crop; flip alone "
                        "on WIDER)")
    t.add_argument("--amp", choices=("none", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, none on CPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--bn", choices=("batch", "sync", "frozen"), default="batch",
                   help="batch norm: each rank's batch, SyncBatchNorm over the ranks (CUDA), "
                        "or frozen running statistics")
    t.add_argument("--out", default="runs/csra", help="checkpoints, log and plot")
    t.add_argument("--resume", default=None, help="continue from a last.pt")
    t.add_argument("--seed", type=count(0), default=0)
    t.add_argument("--synthetic-train", type=count(1), default=2000,
                   help="without --train: synthetic training images")
    t.add_argument("--synthetic-val", type=count(1), default=500,
                   help="without --train: synthetic held-out images")
    t.add_argument("--device", default=None)
    t.add_argument("--split", default=None, help=argparse.SUPPRESS)
    data_options(t)
    scale_option(t, "as the official training: [-1, 1] on WIDER, else [0, 1]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csra_triton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    v = sub.add_parser("verify", help="errors vs float64 and time per call (the default)")
    for p in (parser, v):
        for k in ("B", "d", "h", "w", "C", "heads"):
            p.add_argument(f"--{k}", type=int, default=None, help=f"override the shape's {k}")
        p.add_argument("--dtypes", default="float32,float16,bfloat16")
        p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    b = sub.add_parser("bench", help="eager vs compile vs triton on the benchmark shapes")
    b.add_argument("--shapes", default=None,
                   help="comma-separated names, 'all', or name@B=8@C=9605 overrides "
                        "(default: all on CUDA, a CPU set on CPU)")
    b.add_argument("--pass", dest="passes", default="fwd,fwd+bwd")
    b.add_argument("--impls", default=None,
                   help="subset of " + ",".join(bm.IMPLS) + " (default: all on CUDA, "
                        "eager,compile,triton on CPU)")
    b.add_argument("--out", default="bench/results", help="folder for the results JSON")
    b.add_argument("--plot", action="store_true", help="also write PNG plots (matplotlib)")
    b.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU")
    b.add_argument("--budget-s", type=float, default=None,
                   help="skip compile runs that would start after this many seconds")
    b.add_argument("--e2e-classes", default="80",
                   help="with --e2e: comma list of class counts (80 COCO, 9605 OpenImages)")
    b.add_argument("--host", action="store_true",
                   help="the GPU path's host work without a GPU: launches (Triton + ATen) and "
                        "host µs per call with launches stubbed (csra_triton.tools.hostpath)")
    b.add_argument("--layouts", default="nchw,tokens",
                   help="with --host: comma list of nchw, channels_last, tokens")
    b.add_argument("--deploy", action="store_true",
                   help="deployment rows: the official head and CSRATriton exported alike "
                        "(ONNX run in onnxruntime, AOTInductor), timed in alternation, errors "
                        "vs float64 (default shapes: serving batches, fp32)")
    b.add_argument("--runtimes", default="onnxruntime,aoti",
                   help="with --deploy: comma list of onnxruntime, aoti")
    b.add_argument("--rounds", type=int, default=7,
                   help="with --deploy: alternating rounds per shape and runtime")
    b.add_argument("--e2e", action="store_true",
                   help="also time one ResNet-101 training step (448, B=32, bf16 autocast) with "
                        "the official head and with CSRATriton, eager and compiled (CUDA and "
                        "torchvision only; skipped elsewhere)")
    m = sub.add_parser("maps", help="attention-map PNG grid for held-out synthetic images")
    m.add_argument("--out", default="csra_maps.png", help="PNG to write")
    m.add_argument("--checkpoint", default=None,
                   help="load this model (examples/train_multilabel.py --save), or save to it "
                        "after training when it does not exist")
    m.add_argument("--images", type=int, default=4, help="held-out images shown")
    m.add_argument("--topk", type=int, default=3)
    m.add_argument("--head", type=int, default=0, help="which head's attention to show")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--lam", type=float, default=0.1)
    m.add_argument("--train", type=int, default=3000, help="training images (when training)")
    m.add_argument("--epochs", type=int, default=6)
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tune", help="sweep launch configs on CUDA and cache the best")
    t.add_argument("--shapes", default=None,
                   help="shape names as for bench (default: coco-r101-448,latency-r101-224)")
    t.add_argument("--kernel", choices=["fwd", "ds", "bwd", "all"], default="all",
                   help="fwd: the forward; ds: the backward's dS' kernel (bwd: the same); "
                        "all: both")
    t.add_argument("--budget-s", type=float, default=None,
                   help="per shape and kernel: stop starting new configs after this many seconds")
    i = sub.add_parser("inspect", help="compile every kernel for GPU archs here (no GPU; ten "
                                       "archs with --arch all, sm_90a and sm_80 by default): "
                                       "registers, spills, shared memory, MMA kind, traffic model")
    i.add_argument("--arch", default="sm_90a,sm_80",
                   help="'all' or a comma list of sm_75, sm_80, sm_86, sm_89, sm_90a, sm_100a, "
                        "sm_120, gfx90a, gfx942, gfx950")
    i.add_argument("--layouts", default="nchw",
                   help="comma list of nchw, channels_last, tokens (x's layout)")
    i.add_argument("--shapes", default="all", help="shape names as for bench (default: all)")
    i.add_argument("--dtypes", default=None,
                   help="comma list of fp16,bf16,fp32,fp64 (default: each shape's own)")
    i.add_argument("--kernels", default="prep,fwd,fwd_keep,ds,ds_kept,proj",
                   help="comma list of prep, fwd, fwd_keep (the training forward that keeps "
                        "its scores), ds, ds_kept (dS' from kept scores), proj")
    i.add_argument("--all-configs", action="store_true",
                   help="the whole tuning space of each shape, not only its default config")
    i.add_argument("--json", default=None, help="also write the rows to this JSON file")
    _workflow_parsers(sub)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.cmd in ("predict", "val", "train"):
        from . import workflow

        return getattr(workflow, args.cmd)(args)
    if args.cmd == "inspect":
        return _inspect(args)
    if args.cmd == "tune":
        return _tune(args)
    if args.cmd == "bench":
        return _bench(args)
    if args.cmd == "maps":
        return _maps(args)
    return _verify(args)
