"""The head inside models: torch.compile (no graph breaks, dynamic batch, CUDA graphs),
torch.export, autocast, copy-free layouts, DDP."""
import os
import socket
import tempfile

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import csra_triton
from csra_triton.reference import MHA
from helpers import TOL, ref64, rel_err

import ddp_worker


def _conv_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               csra_triton.CSRATriton(8, 5, heads=4)).to(device)


class _Prologue(torch.nn.Module):
    """A trunk stand-in without a conv (see test_dynamic_batch_one_compilation)."""

    def __init__(self, d):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(d, 1, 1))

    def forward(self, x):
        return torch.relu(x * self.scale)


def test_compile_no_graph_breaks(device):
    model = _conv_model(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # would raise on any graph break
    xc = x.clone().requires_grad_()
    compiled(xc).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [xc.grad.clone()]
    model.zero_grad()
    xe = x.clone().requires_grad_()
    model(xe).square().sum().backward()
    for a, b in zip(grads, [p.grad for p in model.parameters()] + [xe.grad]):
        assert rel_err(a, b) <= 1e-5


def test_dynamic_batch_one_compilation(device):
    """Batch 1..8 after one compilation, batch dim marked unbacked (so that 1 is not special)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Prologue(8), csra_triton.CSRATriton(8, 5, heads=4)).to(device)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for B in range(1, 9):
        x = torch.randn(B, 8, 3, 3, device=device, requires_grad=True)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        y = compiled(x)
        y.sum().backward()
        assert y.shape == (B, 5) and rel_err(y, model(x)) <= 1e-6
    assert counter.frame_count == 1


def test_dynamic_batch_conv_trunk_no_recompiles(device):
    """With a conv trunk, mark_dynamic: batches 2..8 share one compilation. (Batch 1 is
    specialised by Dynamo for any model; mark_unbacked avoids that, but torch 2.13's conv with an
    unbacked batch fails Inductor's stride check on CPU even without this head.)"""
    model = _conv_model(device)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for B in range(2, 9):
        x = torch.randn(B, 3, 6, 6, device=device, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        y = compiled(x)
        y.sum().backward()
        assert rel_err(y, model(x)) <= 1e-5
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_reduce_overhead_cuda_graphs():
    """mode="reduce-overhead": same results as eager, one graph, replays without recompiling."""
    from torch._dynamo.utils import counters

    model = _conv_model("cuda")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    xs = [torch.randn(4, 3, 6, 6, device="cuda") for _ in range(5)]
    with torch.no_grad():
        for x in xs:  # warm-up, capture, then replays
            y = compiled(x).clone()
            assert rel_err(y, model(x)) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1


def test_export(device):
    model = _conv_model(device).eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any("csra_triton" in str(n.target) for n in ep.graph.nodes)
    for B in (2, 5):
        xb = torch.randn(B, 3, 6, 6, device=device)
        assert rel_err(ep.module()(xb), model(xb)) <= 1e-6


def test_autocast_bf16(device):
    """Under autocast the head computes like the official 1x1 conv does: bf16 features, fp32
    weights (rounded for the products, norms from fp32). Outputs match the official module run
    under the same autocast, in its dtype (fp32: the official head divides by fp32 norms);
    gradients match float64 on the same operands and come back in the leaves' dtypes."""
    model = _conv_model(device)
    head = model[2]
    official = MHA.from_weight(head.weight.detach(), head.temperatures, head.lam).to(device)
    x = torch.randn(4, 3, 7, 7, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        feats = model[1](model[0](x))
        y = head(feats)
        y_official = official(feats)
    assert feats.dtype == torch.bfloat16 and y.dtype == y_official.dtype == torch.float32
    assert rel_err(y, y_official) <= TOL[torch.bfloat16]
    # gradients: fp32 features into the head under autocast
    f32 = feats.detach().float().requires_grad_()
    g = torch.randn(4, 5, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = head(f32)
    out.float().backward(g)
    assert f32.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    _, dx, dw = ref64(f32.detach().bfloat16(), head.weight, head.temperatures, head.lam, grad=g)
    assert rel_err(f32.grad, dx) <= TOL[torch.bfloat16]
    assert rel_err(head.weight.grad, dw) <= TOL[torch.bfloat16]


class _OpArgs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.x = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.csra_triton.csra_fwd.default:
            self.x.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_layouts_reach_the_kernel_without_copy(layout, backend, device):
    head = csra_triton.CSRATriton(16, 5, heads=4).to(device)
    x = torch.randn(2, 16, 3, 4, device=device)
    ref = head(x)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()            # (B, N, d), as a ViT emits
    with _OpArgs() as seen:
        y = head.forward_tokens(x) if layout == "tokens" else head(x)
    (x3,) = seen.x
    assert x3.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    B, N, d = 2, 12, 16
    expected = {"nchw": (d * N, N, 1), "channels_last": (N * d, 1, d),
                "tokens": (N * d, 1, d)}[layout]
    assert x3.shape == (B, d, N) and x3.stride() == expected
    assert rel_err(y, ref) <= 1e-6


def test_ddp_matches_single_process():
    """Two CPU processes (gloo), each training on half of the batch, end with the weights of one
    process training on the whole batch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "w.pt")
        # A TCP store on loopback (a free port): the file store's shared file was one more
        # thing the two ranks' teardowns raced on.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.multiprocessing.spawn(ddp_worker.worker,
                                    args=(2, f"tcp://127.0.0.1:{port}", out), nprocs=2, join=True)
        w_ddp = torch.load(out)
    model, x, y = ddp_worker.make_model_and_data()
    ddp_worker.train(model, x, y)
    assert rel_err(w_ddp, model.weight) <= 1e-6
    assert not torch.equal(model.weight, ddp_worker.make_model_and_data()[0].weight)  # it moved
