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


def _float64(model, x, tokens):
    """y of ``model`` in float64 (``csra_reference`` on the head's own input)."""
    from csra_triton.reference import csra_reference

    head = model.head if tokens else model[2]
    with torch.no_grad():
        feats = model.proj(x) if tokens else model[1](model[0](x))
    feats = feats.transpose(1, 2) if tokens else feats
    return csra_reference(feats.double(), head.weight.double(), head.temperatures, head.lam,
                          head.normalize)


def _export(model, x, path):
    batch = torch.export.Dim("batch", min=1, max=64)
    with csra_triton.use_backend("torch"):
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                    verbose=False)
    program.save(str(path))
    return path


def _check_ops(path):
    """The graph holds only the default domain's operators, each defined in the model's opset
    (``full_check``: schemas and shape inference), and no custom op."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    opset = {o.domain: o.version for o in model.opset_import}.get("", None)
    assert opset is not None
    for n in model.graph.node:
        onnx.defs.get_schema(n.op_type, opset, "")          # raises for an op not in the opset
    return {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("tokens", [False, True], ids=["nchw", "tokens"])
@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8])
def test_onnx_runs_in_onnxruntime(heads, tokens, tmp_path):
    """Every official head count, NCHW and tokens, a dynamic batch run at two sizes: y against
    float64 (fp32 rounding: the weight's row scale and temperature folded into one constant
    moves y by an ulp or so), the ops within the opset."""
    model = _model(heads, tokens)
    path = _export(model, _input(2, tokens), tmp_path / "head.onnx")
    graph_ops = _check_ops(path)
    assert "Softmax" in graph_ops and not any("csra" in op for op in graph_ops)
    assert ("MatMul" if tokens else "Conv") in graph_ops      # the scores' product: one node
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for B in (2, 5):                                       # the batch dimension is dynamic
        x = _input(B, tokens)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        assert got.shape == (B, 7)
        assert rel_err(got, _float64(model, x, tokens)) <= 1e-6


@pytest.mark.parametrize("case", ["fp64", "tiny-temperature", "no-normalize", "csra-function",
                                  "many-classes"])
def test_onnx_graph_variants_against_float64(case, tmp_path):
    """The export's other paths: fp64 (a MatMul: onnxruntime's Conv is fp32-only), a
    temperature too small to fold into the weights (multiplied into the scores instead; it
    rounds to a uniform softmax in fp32), normalize off, CSRAFunction's (B, D, N) input, and
    classes enough that the heads are summed by a reduction rather than a constant matrix."""
    from csra_triton.reference import csra_reference

    H, C, D = 4, 7, 16
    temps, lam, normalize, dtype = [1.0, 2.0, 3.0, math.inf], 0.3, True, torch.float32
    if case == "fp64":
        dtype = torch.float64
    if case == "tiny-temperature":
        temps = [1e-30, 2.0, 3.0, math.inf]
    if case == "no-normalize":
        normalize = False
    if case == "many-classes":
        C = 300
    head = CSRATriton(D, C, H, lam, temps, normalize).to(dtype).eval()
    x = torch.randn(2, D, 3, 4, dtype=dtype)
    model = head
    if case == "csra-function":
        class Bdn(torch.nn.Module):
            def forward(self, t):
                return csra_triton.CSRAFunction.apply(t, head.weight, temps, lam, normalize)
        model, x = Bdn().eval(), x.flatten(2)
    path = _export(model, x, tmp_path / "head.onnx")
    _check_ops(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    want = csra_reference(x.double(), head.weight.double(),
                          [0.0 if t == 1e-30 else t for t in temps], lam, normalize)
    assert rel_err(got, want) <= (1e-12 if dtype == torch.float64 else 1e-6)


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
