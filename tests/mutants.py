"""Realistic mutants of the package and the tests that must kill each (not collected by pytest;
run it before calling a change to the tests done, outside CI: minutes).

    python tests/mutants.py                 # every mutant
    python tests/mutants.py NAME [NAME ...] # some (names: python tests/mutants.py --list)

Each mutant replaces one snippet of one file (it must occur exactly once, so that a mutant whose
code moved fails loudly instead of testing nothing) in a copy of this checkout, then runs its
tests there; a mutant survives when they pass. Exit status 1 if any survives (or no longer
applies). The list holds the bugs found by review and by earlier mutation runs: each entry is a
blind spot that a test now covers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(NamedTuple):
    name: str
    path: str          #: the file, relative to the checkout
    old: str           #: a snippet that occurs exactly once there
    new: str           #: what replaces it
    tests: tuple       #: pytest node ids or -k expressions ("file::test" or "file -k expr")


MUTANTS = [
    Mutant("proj-two-pass-drops-projection", "csra_triton/kernels.py",
           "                g = g - w * coef[:, None]", "                g = g",
           ("tests/test_backward.py -k two_pass",)),
    Mutant("tuning-key-without-dtype", "csra_triton/tuning.py",
           "return f\"{kernel}|H={H}|C={C}|D={D}|N={N}|{str(dtype).replace('torch.', '')}\"",
           "return f\"{kernel}|H={H}|C={C}|D={D}|N={N}\"",
           ("tests/test_semantics.py -k tuning_key",)),
    Mutant("fallback-dx-chunks-summed-in-bf16", "csra_triton/fallback.py",
           "self.dx_dtype = acc if (self.gemm != acc and self.chunk < C) else self.gemm",
           "self.dx_dtype = self.gemm",
           ("tests/test_backward.py -k chunks_in_fp32",)),
    Mutant("max-argmax-window-without-rounding", "csra_triton/fallback.py",
           "    slack = slack + torch.maximum(top, -lo_s) * (2.0 ** -7 * (1 + 2.0 ** -8))\n", "",
           ("tests/test_fallback.py -k rounded_window",)),
    Mutant("compiled-call-ignores-normalize", "csra_triton/module.py",
           "    return ops.run(xs, weight, sc, head._normalize, layout, compiling).y",
           "    return ops.run(xs, weight, sc, True if compiling else head._normalize, layout, "
           "compiling).y",
           ("tests/test_semantics.py -k without_recompiling",)),
    Mutant("ds-config-of-other-tiles-serves", "csra_triton/tuning.py",
           "    return tiles is None or cfg.tiles() == tuple(tiles)", "    return True",
           ("tests/test_semantics.py -k other_tiles_never",)),
    Mutant("ds-grid-sized-by-its-own-config", "csra_triton/triton_impl.py",
           "    n_cb = cdiv(c1 - c0, kw[\"BC\"])", "    n_cb = cdiv(c1 - c0, cfg.BC)",
           ("tests/test_semantics.py -k sized_by",)),
    Mutant("forward-mode-ad-not-routed", "csra_triton/ops.py",
           "        or _fwad._current_level >= 0 and _dual(x, weight, lam))",
           "        or False)",
           ("tests/test_entries.py -k dual",)),
    Mutant("csra-function-skips-validation", "csra_triton/module.py",
           "    xs = _check_inputs(x, weight, layout)\n    sc = scalars(",
           "    xs = x if layout == 'bdn' else _check_inputs(x, weight, layout)\n    sc = scalars(",
           ("tests/test_entries.py -k refuses",)),
    Mutant("values-not-remade-after-apply", "csra_triton/module.py",
           "        out = super()._apply(fn, *args, **kwargs)\n        self._derive()",
           "        out = super()._apply(fn, *args, **kwargs)",
           ("tests/test_semantics.py -k to_empty",)),
    Mutant("values-not-remade-on-weight-assign", "csra_triton/module.py",
           "            if name == \"weight\":     # (load_state_dict(assign=True), a new Parameter)\n"
           "                self._derive()",
           "            pass",
           ("tests/test_semantics.py -k meta_init_then_assign",)),
    Mutant("compiled-call-trusts-stale-values", "csra_triton/module.py",
           "        if values is None or values.device != weight.device or \\",
           "        if values is None or \\",
           ("tests/test_semantics.py -k off_the_weights_device",)),
    Mutant("copy-shares-registries", "csra_triton/module.py",
           "        for k in (\"_parameters\", \"_buffers\", \"_modules\"):\n"
           "            state[k] = dict(state[k])\n",
           "",
           ("tests/test_semantics.py -k copy_copy",)),
    Mutant("normalize-read-as-truthy", "csra_triton/common.py",
           "    raise TypeError(f\"normalize: expected a bool, got {normalize!r} "
           "({type(normalize).__name__})\")",
           "    return bool(normalize)",
           ("tests/test_entries.py -k refuses",)),
    Mutant("zero-gradients-materialised", "csra_triton/ops.py",
           "    ctx.set_materialize_grads(False)", "    pass",
           ("tests/test_hostpath.py -k zero_gradients",)),
    Mutant("op-runs-on-mixed-devices", "csra_triton/ops.py",
           "    if weight.device != x.device or values.device != x.device:",
           "    if False:",
           ("tests/test_entries.py -k meta_is_refused",)),
    Mutant("learnable-lam-left-out-of-the-values", "csra_triton/ops.py",
           "        values = torch.cat((values[:-1], lam.reshape(1).to(torch.float64)))",
           "        values = values",
           ("tests/test_state.py -k learnable",)),
    Mutant("op-returns-a-dx-view", "csra_triton/ops.py",
           "    return x.new_empty((B * N, D) if channels_inner(x) else (D, B * N)), "
           "torch.empty_like(weight)",
           "    return dx_of(x.new_empty((B * N, D) if channels_inner(x) else (D, B * N)), x), "
           "torch.empty_like(weight)",
           ("tests/test_semantics.py -k inductor_dynamic",)),
    Mutant("interpret-read-from-the-environment", "csra_triton/triton_impl.py",
           "INTERPRET = _compat.interpreted(kernels.csra_fwd_kernel)",
           "INTERPRET = __import__(\"os\").environ.get(\"TRITON_INTERPRET\", \"0\").strip() == \"1\"",
           ("tests/test_semantics.py -k triton_interpret_means",)),
    Mutant("wider-trains-with-the-crop", "csra_triton/tools/data.py",
           '    return "flip" if data.kind == "wider" else "flip+crop"', '    return "flip+crop"',
           ("tests/test_workflow.py -k recipe_follows",)),
    Mutant("wider-pixels-in-unit-range", "csra_triton/tools/data.py",
           '    return "half" if data.kind == "wider" else "unit"', '    return "unit"',
           ("tests/test_workflow.py -k recipe_follows",)),
    Mutant("voc-steps-every-5-epochs", "csra_triton/tools/data.py",
           '    return 4 if data.kind == "voc07" else 5', '    return 5',
           ("tests/test_workflow.py -k recipe_follows",)),
    Mutant("resume-takes-the-new-flags", "csra_triton/tools/workflow.py",
           '        cfg = {**_train_config(args, train_data, len(names)), **resume["config"]}',
           '        cfg = {**resume["config"], **_train_config(args, train_data, len(names))}',
           ("tests/test_workflow.py -k resume_keeps",)),
    Mutant("val-scores-not-gathered", "csra_triton/tools/workflow.py",
           "        dist.all_gather_object(parts, out)", "        parts = [out]",
           ("tests/test_workflow.py -k two_ranks",)),
    Mutant("empty-dataset-accepted", "csra_triton/tools/data.py",
           "    if not samples:\n        raise DataError(f\"{where}: no samples\")", "",
           ("tests/test_workflow.py -k broken_data",)),
    Mutant("voc-difficult-counted-negative", "csra_triton/tools/metrics.py",
           "        keep = target != 0\n        return scores[keep], (target[keep] == 1).astype("
           "np.float64)\n    if rule == \"wider\":\n        keep = target != 99",
           "        keep = target == target\n        return scores[keep], (target[keep] == 1)."
           "astype(np.float64)\n    if rule == \"wider\":\n        keep = target != 99",
           ("tests/test_workflow.py -k metrics",)),
    Mutant("ap-ties-in-reverse-order", "csra_triton/tools/metrics.py",
           "    order = np.argsort(-scores, kind=\"stable\")",
           "    order = len(scores) - 1 - np.argsort(-scores[::-1], kind=\"stable\")",
           ("tests/test_workflow.py -k ap_hand or metrics",)),
    Mutant("no-prediction-not-counted-as-one", "csra_triton/tools/metrics.py",
           "    pred = np.where(pred == 0, 1.0, pred)", "    pred = pred",
           ("tests/test_workflow.py -k metrics",)),
    Mutant("wider-unknown-left-out-of-precision", "csra_triton/tools/metrics.py",
           "        return scores, np.where(target == 99, 0.0, target)",
           "        return scores[target != 99], target[target != 99]",
           ("tests/test_workflow.py -k metrics",)),
]


def _copy_tree(dst: str) -> None:
    """The checkout's files (tracked and untracked, not ignored) copied into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(src, os.path.join(dst, f))


def run(mutant: Mutant, workdir: str) -> str:
    """"killed", "SURVIVED" or "does not apply" (its snippet is gone or repeated)."""
    path = os.path.join(workdir, mutant.path)
    original = open(os.path.join(ROOT, mutant.path)).read()
    if original.count(mutant.old) != 1:
        return "does not apply"
    with open(path, "w") as f:
        f.write(original.replace(mutant.old, mutant.new))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env["PYTHONPATH"] = workdir
        for spec in mutant.tests:
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   "--benchmark-disable", *spec.split(" ", 1)[0:1]]
            if " -k " in spec:
                cmd += ["-k", spec.split(" -k ", 1)[1]]
            out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
            if out.returncode == 5:
                return "does not apply (its tests selected nothing)"
            if out.returncode != 0:
                return "killed"
        return "SURVIVED"
    finally:
        with open(path, "w") as f:
            f.write(original)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.path}; killed by {', '.join(m.tests)}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutants {sorted(unknown)}")
    bad = 0
    with tempfile.TemporaryDirectory(prefix="csra-mutants-") as workdir:
        _copy_tree(workdir)
        for m in chosen:
            t0 = time.monotonic()
            verdict = run(m, workdir)
            bad += verdict != "killed"
            print(f"{verdict:>10}  {m.name}  ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
