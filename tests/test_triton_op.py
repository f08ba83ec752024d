"""The CUDA ops are ``triton_op``s: under torch.compile their kernels reach Inductor's graph.

Proven here without a GPU by tracing them as AOTAutograd does for torch.compile, with fake
CUDA tensors (tests/scripts/trace_cuda_ops.py, in a subprocess: this process imported the
kernels for the interpreter). That needs a torch build with CUDA (CI's torch 2.14.1 block);
the CPU wheel cannot make CUDA tensors even as fakes. Compiling and running the traced graph
needs a GPU (bench/gpu_check.sh)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# one worker builds the module-scoped fixture for every test here
pytestmark = pytest.mark.xdist_group("test_triton_op")

SCRIPT = Path(__file__).parent / "scripts" / "trace_cuda_ops.py"


@pytest.fixture(scope="module")
def traced():
    if not torch.backends.cuda.is_built():
        pytest.skip("needs a torch build with CUDA (fake CUDA tensors); CPU wheels have none")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_graph_launches_the_kernels(traced):
    fwd = traced["fwd"]
    assert fwd["kernels"] == ["csra_prep_kernel", "csra_fwd_kernel"]
    # the scalar parameters are made on the device: no copy from the host, no host tensor
    # lifted into the graph
    assert fwd["h2d"] == 0 and "aten.lift_fresh_copy.default" not in fwd["aten"], fwd["aten"]


def test_training_forward_graph_keeps_the_scores(traced):
    """The training forward (keep=True; traced as the op: autograd's own backward trace needs a
    GPU context) keeps its raw scores (H, C, B, N) = (4, 9, 2, 9) in fp32 for the backward
    (H*C = 36 <= d = 64; Hopper, the arch assumed without a GPU); inference does not."""
    train = traced["train"]
    assert train["kernels"] == ["csra_prep_kernel", "csra_fwd_kernel"]
    assert [4, 9, 2, 9] in train["outputs"], train["outputs"]
    assert [4, 9, 2, 9] not in traced["fwd"]["outputs"]


@pytest.mark.parametrize("which", ["bwd", "bwd_recompute"])
def test_backward_graph_launches_the_kernels_and_two_gemms(traced, which):
    """dS' elementwise from the kept scores, or recomputed where none were kept; then the
    projection and two GEMMs."""
    bwd = traced[which]
    ds = "csra_ds_kept_kernel" if which == "bwd" else "csra_ds_kernel"
    assert bwd["kernels"] == [ds, "csra_proj_kernel"]
    assert bwd["aten"].count("aten.mm.default") == 2
    assert bwd["h2d"] == 0
    # no out= views written back into buffers (each would be a copy in Inductor's code)
    assert not [a for a in bwd["aten"] if "scatter" in a], bwd["aten"]


@pytest.mark.parametrize("which", ["fwd_values", "bwd"])
def test_the_values_reach_the_kernels_on_the_device(traced, which):
    """The ops take the temperatures and lam as one values tensor (a compiled module's graph
    input): the traced graph makes the kernels' parameter tensor from it on the device (a cast
    and a cat), with no host tensor lifted into the graph, and launches the same kernels."""
    got = traced[which]
    want = (["csra_prep_kernel", "csra_fwd_kernel"] if which == "fwd_values"
            else ["csra_ds_kept_kernel", "csra_proj_kernel"])
    assert got["kernels"] == want
    assert "aten.cat.default" in got["aten"]
    assert got["h2d"] == 0 and "aten.lift_fresh_copy.default" not in got["aten"], got["aten"]
