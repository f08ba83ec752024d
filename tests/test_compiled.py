"""The compile report (``python -m csra_triton inspect``): every kernel at every DESIGN shape's
default config, compiled here for sm_90a (H100/H200) and sm_80 (A100) without a GPU.

It runs in a subprocess: this process imported the kernels for Triton's interpreter (no GPU),
and the report needs Triton's compiler. The numbers asserted are the Hopper targets of
bench/NOTES.md: no register spills, warpgroup MMA (wgmma) for every 16-bit and TF32 score
product (H=1 included), and at most 0.3 GB moved into the SMs by the headline forward and
backward score kernels (the traffic model of csra_triton/compiled.py)."""
import json
import os
import subprocess
import sys

import pytest

from csra_triton.benchmark import HEADLINE, SHAPES


def _inspect(tmp_path_factory, *args, **env_over):
    tmp = tmp_path_factory.mktemp("inspect")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_over)
    env["CSRA_TRITON_INSPECT_CACHE"] = str(tmp / "cache.json")
    path = tmp / "report.json"
    proc = subprocess.run([sys.executable, "-m", "csra_triton", "inspect", *args, "--json",
                           str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _inspect(tmp_path_factory, "--arch", "sm_90a,sm_80")


#: Where Triton specialises arguments equal to 1 into constants (N=1, B=1, C=1, H=1) and d is
#: not a multiple of any tile: code the interpreter runs fine can fail to compile there (it
#: did: ``N.to(...)`` on a constant int, caught on the first GPU run).
EDGES = "latency-r101-224@B=1@h=1@w=1@C=1@d=3@heads=1,coco-r101-448@B=2@h=1@w=1@d=129"


def test_edge_shapes_compile_for_every_dtype(tmp_path_factory):
    doc, _ = _inspect(tmp_path_factory, "--arch", "sm_90a", "--shapes", EDGES, "--dtypes",
                      "bf16,fp16,fp32,fp64")
    rows = doc["rows"]
    assert len(rows) == 2 * 4 * 4
    for r in rows:
        assert r["regs"] > 0
        if r["dtype"] != "float64":
            assert r["spill_bytes"] == 0, r


def test_class_block_major_order_compiles_spill_free(tmp_path_factory):
    """The launch order of weights > 8 MB (9,605 classes), forced at the headline and at the
    edge shapes: the same spill-free tensor-core kernels."""
    doc, _ = _inspect(tmp_path_factory, "--arch", "sm_90a", "--shapes", f"{HEADLINE},{EDGES}",
                      "--kernels", "fwd,ds", CSRA_TRITON_CB_MAJOR_BYTES="0")
    assert len(doc["rows"]) == 3 * 2
    for r in doc["rows"]:
        assert r["spill_bytes"] == 0, r
        if r["shape"] == HEADLINE:
            assert r["mma"] == "wgmma", r


def test_every_kernel_of_every_shape_is_reported(report):
    doc, table = report
    rows = doc["rows"]
    assert doc["triton"] and "| kernel | arch |" in table
    for arch in ("sm_90a", "sm_80"):
        for shape in SHAPES:
            got = {r["kernel"] for r in rows if r["arch"] == arch and r["shape"] == shape}
            assert got == {"prep", "fwd", "ds", "proj"}, (arch, shape, got)
    for r in rows:
        assert r["default"] and r["regs"] > 0 and r["model"]["hbm_bytes"] > 0


def test_hopper_defaults_spill_free_on_wgmma(report):
    for r in report[0]["rows"]:
        if r["arch"] != "sm_90a":
            continue
        assert r["spill_bytes"] == 0, r
        if r["kernel"] not in ("prep", "proj"):   # elementwise over weight rows: no product
            assert r["mma"] == "wgmma", r


def test_ampere_defaults_use_tensor_cores(report):
    for r in report[0]["rows"]:
        if r["arch"] == "sm_80" and r["kernel"] not in ("prep", "proj"):
            assert r["mma"] == "mma", r


def test_headline_traffic_model(report):
    rows = {r["kernel"]: r for r in report[0]["rows"]
            if r["arch"] == "sm_90a" and r["shape"] == HEADLINE}
    for kernel in ("fwd", "ds"):
        assert rows[kernel]["model"]["sm_bytes"] <= 0.3e9, rows[kernel]
    # The floor the model gives is at least the DESIGN floor (16.4 GFLOP, 51 MB of x).
    assert rows["fwd"]["model"]["floor_us"] >= 16.4e9 / 798e12 * 1e6
