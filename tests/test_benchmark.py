"""The benchmark layer on CPU: floors, shapes, the bench CLI's JSON and table, README rendering."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from csra_triton.tools import benchmark as bm
from csra_triton.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = "coco-r101-448@B=2@d=32@h=3@w=3@C=5"

# docs/performance.md, H100 column: (fwd floor, fwd+bwd floor) in ms
FLOORS = {
    "coco-r101-448": (0.0206, 0.082), "voc-r101-448": (0.0172, 0.069),
    "coco-vitl16-448": (0.0412, 0.165), "openimages-r101-448": (1.24, 4.9),
    "latency-r101-224": (0.0005, 0.002), "coco-r101-448-fp32": (0.041, 0.165),
}


@pytest.mark.parametrize("name", list(FLOORS))
def test_floors_match_design(name):
    fwd, both = FLOORS[name]
    shape = bm.SHAPES[name]
    assert shape.floor_ms("fwd", "h100") == pytest.approx(fwd, rel=0.03)
    assert shape.floor_ms("fwd+bwd", "h100") == pytest.approx(both, rel=0.03)
    assert shape.floor_ms("fwd", "cpu") is None


def test_parse_shapes():
    (s,) = bm.parse_shapes("openimages-r101-448@B=2@C=7")
    assert (s.B, s.C, s.d, s.heads, s.name) == (2, 7, 2048, 4, "openimages-r101-448@B=2@C=7")
    assert len(bm.parse_shapes("all")) == len(bm.SHAPES)
    with pytest.raises(ValueError, match="unknown shape"):
        bm.parse_shapes("imagenet")
    with pytest.raises(ValueError, match="bad override"):
        bm.parse_shapes("voc-r101-448@X=3")


#: On the CPU, --plot times the headline forward at batches 1, 2, 4 (peak memory vs classes is
#: CUDA-only); on CUDA it sweeps batches and 9,605 classes with every impl, a GPU benchmark.
PLOT = importlib.util.find_spec("matplotlib") is not None and not torch.cuda.is_available()


def test_bench_cli_writes_design_json(tmp_path, capsys, monkeypatch):
    """One bench run (both passes, every impl) checked for its JSON, its table and, on the CPU
    with matplotlib, its plot."""
    monkeypatch.setattr(bm, "HEADLINE", "latency-r101-224")  # small enough for a CPU test
    rc = main(["bench", "--shapes", TINY, "--out", str(tmp_path), "--reps", "1"]
              + (["--plot"] if PLOT else []))
    out = capsys.readouterr().out
    assert rc == 0
    cuda = torch.cuda.is_available()
    if not cuda:
        assert "CPU numbers" in out and "Triton kernel timings need CUDA" in out
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert set(doc) >= {"device", "torch", "triton", "commit", "rows"}
    assert (doc["device"] == "cpu") != cuda
    impls = bm.IMPLS if cuda else ("eager", "compile", "triton")
    assert {(r["pass"], r["impl"]) for r in doc["rows"]} == {
        (p, i) for p in ("fwd", "fwd+bwd") for i in impls}
    for r in doc["rows"]:
        assert set(r) >= {"shape", "B", "d", "h", "w", "C", "heads", "dtype", "pass", "impl",
                          "median_ms", "peak_mem_mb", "max_rel_err"}
        assert r["median_ms"] > 0 and r["max_rel_err"] < 0.2
        assert r["host_us"] > 0 and (r["device_us"] is None) != cuda
    table = out[out.index("| shape | pass"):]
    assert table.count("\n| coco-r101-448@") == 2 + 2 * len(impls) and "×" in table
    assert "| host µs | device µs |" in table
    if not cuda:    # what the fallback followed, eager/compile/ours timed in alternation, the floor
        assert "capability" in doc["cpu"] and "native bf16" in doc["cpu"]
        assert doc["bf16_gemm"] in ("bfloat16", "float32") and "native bf16" in out
        assert all(r["interleaved"] == list(impls) for r in doc["rows"])
        assert all(r["floor_ms"] > 0 for r in doc["rows"])
    if PLOT:
        assert (tmp_path / "time_vs_batch-cpu.png").stat().st_size > 1000
        assert "measured on CUDA only" in out


def _render(tmp_path, docs):
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "bench/render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = tmp_path / "results"
    results.mkdir()
    for name, doc in docs.items():
        (results / name).write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{mod.BEGIN}\nold\n{mod.END}\nafter\n")
    assert mod.main(["--readme", str(readme), "--results", str(results)]) == 0
    return readme.read_text()


def _row(impl, ms, **kw):
    s = bm.SHAPES["coco-r101-448"]
    return dict(s.row_fields(), **{"pass": "fwd", "impl": impl, "median_ms": ms,
                                   "peak_mem_mb": 10.0, "max_rel_err": 1e-3}, **kw)


def test_render_readme_from_newest_gpu_json(tmp_path):
    old = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
           "commit": "a" * 40, "date": "2026-11-01", "rows": [_row("triton", 1.0)]}
    new = dict(old, date="2026-11-20", commit="b" * 40,
               rows=[_row("eager", 0.4), _row("compile", 0.2), _row("triton", 0.04)])
    cpu = dict(new, device="cpu", date="2026-12-01", commit="c" * 40)
    text = _render(tmp_path, {"2026-11-01-h100.json": old, "2026-11-20-h100.json": new,
                              "2026-12-01-cpu.json": cpu})
    assert "NVIDIA H100 80GB HBM3" in text and "2026-11-20" in text and "b" * 12 in text
    assert "c" * 12 not in text and "a" * 12 not in text
    assert "10.00×" in text and "5.00×" in text and "52%" in text  # floor 0.0206 / 0.04 ms
    assert text.endswith("after\n")


def test_render_readme_without_results(tmp_path):
    assert "No GPU results" in _render(tmp_path, {})


def test_readme_performance_section_is_current():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "bench/render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python bench/render_readme.py"
