"""Renders the README's performance section from the newest GPU results JSON in bench/results/.

    python bench/render_readme.py           # rewrite the section between the markers
    python bench/render_readme.py --check   # exit 1 if the README is not what the JSON renders

Every figure comes from the JSON and names its GPU, date and commit; nothing is typed by hand.
CPU results files (device "cpu") are never rendered.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csra_triton.tools import benchmark as bm  # noqa: E402

BEGIN, END = "<!-- perf:begin (bench/render_readme.py) -->", "<!-- perf:end -->"
NOTHING = ("No GPU results are committed yet (`bench/results/` holds no GPU JSON), so this README "
           "makes no speed claim. The CPU numbers that `python -m csra_triton bench` prints are "
           "CPU numbers: Triton kernel timings need CUDA.")


def newest_gpu_results(results_dir: Path, key: str = "rows") -> tuple[Path, dict] | None:
    """The newest GPU results JSON (by date, then name) that has ``key`` (rows, or e2e)."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("device", "cpu") != "cpu" and doc.get(key):
            found.append((doc.get("date", ""), path.name, path, doc))
    if not found:
        return None
    _, _, path, doc = max(found, key=lambda t: (t[0], t[1]))
    return path, doc


def render(results_dir: Path) -> str:
    got = newest_gpu_results(results_dir)
    if got is None:
        return NOTHING
    path, doc = got
    gpu = next((t for t in bm.CEILINGS if t in doc["device"].lower()), "gpu")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    lines = [f"Measured on **{doc['device']}**, {doc['date']}, commit `{doc['commit'][:12]}`, "
             f"torch {doc['torch']}, triton {doc['triton']} (`{shown}`). "
             "Times are CUDA-event medians; speed-ups are csra-triton's; % of floor is "
             "floor / csra-triton time; peak MB is memory beyond the inputs during one pass.", "",
             bm.summary_table(doc["rows"], gpu)]
    if doc.get("skipped"):
        lines += ["", f"Not measured in that run ({doc['skipped']['reason']}): "
                  + ", ".join(doc["skipped"]["runs"]) + "."]
    if doc.get("failed"):
        lines += ["", "Failed in that run: " + "; ".join(doc["failed"]) + "."]
    e2e = newest_gpu_results(results_dir, key="e2e")
    if e2e is not None:
        e2e_path, e2e_doc = e2e
        lines += ["", f"One training step end to end (`{e2e_path.name}`, {e2e_doc['device']}, "
                  f"commit `{e2e_doc['commit'][:12]}`):", "", bm.e2e_table(e2e_doc["e2e"])]
    return "\n".join(lines)


def splice(readme: str, body: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no performance markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    new = splice(old, render(args.results))
    if args.check:
        if new != old:
            print("README performance section is stale: run python bench/render_readme.py")
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
