"""Deployment paths: ONNX (torch.onnx.export, dynamo) run in onnxruntime, and AOTInductor
(torch.export -> aoti_compile_and_package -> aoti_load_package), both on CPU.

Under ``torch.onnx.export`` the head is written in standard operators (``graph.onnx_graph``,
the kernels' math): ONNX has no translation for the custom op. AOTInductor keeps the custom op
and calls it through its proxy executor, which is why max heads reach the op as temperature 0
(a float list with inf serialises as a string and the package failed to load)."""
import math

import pytest
import torch

import csra_triton
from csra_triton import CSRATriton
from helpers import rel_err

pytestmark = pytest.mark.no_triton   # ONNX and AOTInductor on the PyTorch fallback

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Tokens(torch.nn.Module):
    """A ViT-style use: (B, N, d) tokens through ``forward_tokens``."""

    def __init__(self, head):
        super().__init__()
        self.proj, self.head = torch.nn.Linear(8, head.in_ch), head

    def forward(self, t):
        return self.head.forward_tokens(self.proj(t))


def _model(heads, tokens=False):
    head = CSRATriton(16, 7, heads=heads, lam=0.3)
    if tokens:
        return Tokens(head).eval()
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU(), head).eval()


def _input(B, tokens):
    return torch.randn(B, 12, 8) if tokens else torch.randn(B, 3, 5, 4)


@pytest.mark.parametrize("tokens", [False, True], ids=["nchw", "tokens"])
@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8])
def test_onnx_runs_in_onnxruntime(heads, tokens, tmp_path):
    model = _model(heads, tokens)
    batch = torch.export.Dim("batch", min=1, max=64)
    path = tmp_path / "head.onnx"
    with csra_triton.use_backend("torch"):
        program = torch.onnx.export(model, (_input(2, tokens),), dynamo=True,
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))
    graph_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Softmax" in graph_ops and not any("csra" in op for op in graph_ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for B in (2, 5):                                       # the batch dimension is dynamic
        x = _input(B, tokens)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        with torch.no_grad(), csra_triton.use_backend("torch"):
            want = model(x)
        assert got.shape == (B, 7)
        assert rel_err(got, want) <= 1e-5


def test_aotinductor_package_round_trip(tmp_path):
    model = _model(4)                                      # [1, 2, 4, inf]: a max head included
    assert math.isinf(model[2].temperatures[-1])
    batch = torch.export.Dim("batch", min=2, max=64)
    with csra_triton.use_backend("torch"):
        ep = torch.export.export(model, (_input(2, False),), dynamic_shapes=({0: batch},))
        assert any("csra_triton" in str(n.target) for n in ep.graph.nodes)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for B in (2, 5):
            x = _input(B, False)
            with torch.no_grad():
                assert rel_err(runner(x), model(x)) <= 1e-5
