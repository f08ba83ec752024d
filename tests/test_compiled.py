"""The compile report (``python -m csra_triton inspect``): every kernel at every DESIGN shape's
default config, compiled here without a GPU for every arch of ``archs.ARCHS``: sm_75, sm_80,
sm_86, sm_89, sm_90a, sm_100a, sm_120 and AMD gfx90a, gfx942, gfx950.

It runs in a subprocess: this process imported the kernels for Triton's interpreter (no GPU),
and the report needs Triton's compiler. What CI holds, under triton 3.9 and 3.6 (and 3.8):
for every arch, every benchmark shape in NCHW in its own dtype (fp16 where the arch has no
bf16) and the headline in every layout (NCHW, channels_last, tokens) and dtype (bf16, fp16,
fp32 TF32): 0 spill bytes, shared memory within the arch's per-block limit, every product on
the arch's tensor-core instruction (wgmma, tcgen05, mma.sync, mfma; FMA on sm_75, where
Triton has none). About 280 compilations, a few minutes a Triton version (Triton's own
compile cache makes repeat runs on one machine take seconds). Also the Hopper
traffic targets of bench/NOTES.md: at most 0.3 GB moved into the SMs by the headline forward
and backward score kernels."""
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
    # one compile cache for this run's reports (fresh per run: nothing from another commit)
    env["CSRA_TRITON_INSPECT_CACHE"] = str(tmp_path_factory.getbasetemp() / "inspect-cache.json")
    path = tmp / "report.json"
    proc = subprocess.run([sys.executable, "-m", "csra_triton", "inspect", *args, "--json",
                           str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _inspect(tmp_path_factory, "--arch", "all")


@pytest.fixture(scope="module")
def layouts_report(tmp_path_factory):
    return _inspect(tmp_path_factory, "--arch", "all", "--shapes", HEADLINE, "--layouts",
                    "nchw,channels_last,tokens", "--dtypes", "bf16,fp16,fp32",
                    "--kernels", "fwd,ds")


ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx90a", "gfx942",
         "gfx950")


def test_every_arch_keeps_the_rules(report, layouts_report):
    """0 spills, shared memory within the arch's limit, tensor cores for every product."""
    for doc, _ in (report, layouts_report):
        assert doc["broken"] == [], "\n".join(doc["broken"])
        assert {r["arch"] for r in doc["rows"]} == set(ARCHS)
    layouts = {(r["arch"], r["layout"], r["dtype"]) for r in layouts_report[0]["rows"]}
    for arch in ARCHS:
        dtypes = ("float16", "float32") if arch == "sm_75" else ("bfloat16", "float16", "float32")
        for layout in ("nchw", "channels_last", "tokens"):
            for dt in dtypes:
                assert (arch, layout, dt) in layouts, (arch, layout, dt)


def test_products_are_counted_per_site(report):
    """The MMA column counts each product (tl.dot site after pipelining), so that one product
    off the tensor cores would show as 'mixed'."""
    for r in report[0]["rows"]:
        if r["kernel"] in ("fwd", "ds"):
            assert sum(r["mma_sites"].values()) >= 2, r
            assert r["mma"] == r["mma_expected"] or r["dtype"] == "float32", r


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
    for arch in ARCHS:
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


def test_model_v2_is_calibrated_on_the_h200(report):
    """Model v2 (CTAs per SM, waves, per-SM rates, pipelined or serial loads) against the H200
    measurements of the v1 kernels (unchanged since): each headline kernel within +-25%, and the
    other measured rows (kernel sums: openimages forward 2.90 ms, vitl16 forward 0.21 ms)."""
    from csra_triton.compiled import MEASURED_H200

    rows = {(r["kernel"], r["shape"]): r["model_v2"]["time_us"] for r in report[0]["rows"]
            if r["arch"] == "sm_90a"}
    for key, measured in MEASURED_H200.items():
        assert abs(rows[key] / measured - 1) <= 0.25, (key, rows[key], measured)
    for shape, measured in (("openimages-r101-448", 2900.0), ("coco-vitl16-448", 210.0)):
        modelled = rows[("prep", shape)] + rows[("fwd", shape)]
        assert abs(modelled / measured - 1) <= 0.25, (shape, modelled, measured)
