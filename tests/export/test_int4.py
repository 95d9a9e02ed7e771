"""Block-wise int4 weights (MatMulNBits): every linear layer, Gemms included, sizes, error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from litedge.errors import LitedgeError
from litedge.export.onnx_io import cpu_session
from litedge.quantize.int4 import gemm_to_matmul, layer_name, quantize_int4

WIDTH = 256  # linears dominate the file: ~5 bits per weight (int4 + fp32 scale per 32 + fp32 bias) -> 0.16x


class LinearHeavy(nn.Module):
    """A DiT-shaped toy: a 2-D conditioning MLP (exported as Gemm) modulating a 3-D token MLP (MatMul)."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))
        self.proj_out = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.cond(cond).chunk(2, dim=-1)  # (B, width) each
        x = tokens * (1 + scale[:, None]) + shift[:, None]  # (B, N, width)
        return self.proj_out(x + self.mlp(x))


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    torch.manual_seed(0)
    model = LinearHeavy().eval()
    path = tmp_path_factory.mktemp("int4") / "toy.onnx"
    args = (torch.randn(2, 16, WIDTH), torch.randn(2, WIDTH))
    torch.onnx.export(
        model, args, str(path), dynamo=False, opset_version=17, input_names=["tokens", "cond"],
        output_names=["out"], dynamic_axes={"tokens": {0: "batch", 1: "n"}, "cond": {0: "batch"}, "out": {0: "batch", 1: "n"}},
    )
    return path


def inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.standard_normal((3, 10, WIDTH), dtype=np.float32), "cond": rng.standard_normal((3, WIDTH), dtype=np.float32)}


def test_exported_toy_has_gemms(fp32_model):
    ops = [n.op_type for n in onnx.load(str(fp32_model)).graph.node]
    assert ops.count("Gemm") == 2 and ops.count("MatMul") == 3  # the premise of the Gemm rewrite


def test_every_linear_is_int4(fp32_model, tmp_path):
    report = quantize_int4(fp32_model, tmp_path / "toy.int4.onnx", check_inputs=inputs())
    assert report.gemm_rewritten == 2
    assert report.linear_total == 5 and report.left_fp32 == {}
    assert sorted(report.quantized) == ["cond.0", "cond.2", "mlp.0", "mlp.2", "proj_out"]
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops.count("MatMulNBits") == 5 and "Gemm" not in ops and "MatMul" not in ops
    # sizes: measured 0.16x (2.1 MB -> 340 kB)
    assert report.size_ratio <= 0.2, report.summary()
    # error of int4 (random weights, block 32, symmetric) vs fp32: measured rel_err 0.06
    assert 0 < report.fidelity["rel_err"] < 0.1, report.summary()


def test_exclude_keeps_named_layers_fp32(fp32_model, tmp_path):
    report = quantize_int4(fp32_model, tmp_path / "toy.int4.onnx", exclude=["proj_out", "cond.0"], check_inputs=inputs())
    assert report.left_fp32 == {"proj_out": "excluded", "cond.0": "excluded"}
    assert len(report.quantized) == 3
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("MatMul") == 2  # cond.0 stays fp32 as MatMul + Add


def test_bad_arguments_are_errors(fp32_model, tmp_path):
    with pytest.raises(LitedgeError, match="matches no linear layer"):
        quantize_int4(fp32_model, tmp_path / "x.onnx", exclude=["proj_ou"])  # a typo never passes silently
    with pytest.raises(LitedgeError, match="another file"):
        quantize_int4(fp32_model, fp32_model)
    with pytest.raises(LitedgeError, match="export the model first"):
        quantize_int4(tmp_path / "missing.onnx", tmp_path / "x.onnx")


def test_asymmetric_and_block_size(fp32_model, tmp_path):
    report = quantize_int4(fp32_model, tmp_path / "a.onnx", block_size=64, symmetric=False, check_inputs=inputs())
    assert report.left_fp32 == {} and 0 < report.fidelity["rel_err"] < 0.1
    node = next(n for n in onnx.load(str(report.path)).graph.node if n.op_type == "MatMulNBits")
    assert len(node.input) == 4  # zero points
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size")) == 64
    with pytest.raises(LitedgeError, match="block_size"):
        quantize_int4(fp32_model, tmp_path / "b.onnx", block_size=24)


def test_gemm_rewrite_is_exact_with_alpha_beta_transb(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 5), dtype=np.float32), rng.standard_normal(6, dtype=np.float32)
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/lin/Gemm", alpha=0.5, beta=2.0, transB=1)
    graph = helper.make_graph(
        [gemm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before, after = tmp_path / "gemm.onnx", tmp_path / "matmul.onnx"
    onnx.save(model, str(before))
    assert gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    assert [n.name for n in model.graph.node] == ["/lin/MatMul", "/lin/Add"]
    onnx.save(model, str(after))
    x = rng.standard_normal((4, 5), dtype=np.float32)
    ref = cpu_session(before).run(None, {"x": x})[0]
    np.testing.assert_allclose(cpu_session(after).run(None, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, 0.5 * x @ w.T + 2.0 * b, rtol=1e-5, atol=1e-5)


def test_layer_names():
    assert layer_name("/model/transformer_blocks.0/attn1/to_q/MatMul") == "model.transformer_blocks.0.attn1.to_q"
    assert layer_name("/proj_out/MatMul") == "proj_out"
    assert layer_name("/cond/cond.0/Gemm") == "cond.0"  # nn.Sequential scopes repeat the parent
    assert layer_name("MatMul_3") == "MatMul_3"


def test_exported_pixart_is_fully_quantized(tmp_path):
    """End to end on a real diffusers graph: the adaLN / timestep Gemms are quantized too."""
    from tests.export.test_onnx_export import tiny_pixart

    from litedge.export.onnx_export import export_transformer
    from litedge.export.specs import SampleSize, transformer_wrapper

    model = tiny_pixart()
    exported = export_transformer(model, tmp_path / "transformer.onnx")
    assert list(exported.sample_inputs) == transformer_wrapper(model).spec().input_names
    wrapper = transformer_wrapper(model)
    sample = wrapper.sample_inputs(SampleSize(2, 8, 12, 5), seed=9)
    feeds = {n: t.numpy() for n, t in zip(wrapper.spec().input_names, sample)}
    report = quantize_int4(exported.path, tmp_path / "transformer.int4.onnx", check_inputs=feeds)
    assert report.gemm_rewritten == 3 and report.left_fp32 == {}
    assert "model.adaln_single.linear" in report.quantized and "proj_out" in report.quantized
    assert 0 < report.fidelity["rel_err"] < 0.1, report.summary()  # measured 0.076 (width 32, random weights)
