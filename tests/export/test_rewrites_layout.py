"""The export layout of the linear attentions: fewer layout nodes, the same numbers.

LiT and EDiT compute their linear attention channel-first (tokens on the last axis,
:func:`litedge.models.linear_attention.linear_attention_channels`): the per-head operands
are free reshapes of what the projections and convolutions produce, so the head split /
merge transposes and the depthwise conv's permutes leave the graph. Each module is exported
twice, in that layout (its ``forward``) and in the token-major reference layout (its
``project`` + :func:`linear_attention` + merge, the formulation the module had before),
and both are compared: fp32 onnxruntime vs PyTorch's reference layout (rel err < 1e-4),
node counts before / after, in the exported graph and after onnxruntime's optimizer.
"""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from litedge.models.edit_attention import EDiTAttention
from litedge.models.linear_attention import LiTAttention, linear_attention, linear_attention_channels, merge_heads
from litedge.models.reference import edit_reference, lit_reference

GRID = (12, 20)  # non-square: a transposed grid reshape shows
BATCH, WIDTH = 2, 64
LAYOUT_OPS = ("Transpose", "Reshape", "Mul")


class _WithGrid(nn.Module):
    """``attn(x, grid)`` as a one-input module (the layout under test: ``forward``)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, grid=GRID)


class _ReferenceLayout(_WithGrid):
    """The token-major formulation: heads split to (B, h, N, d), merged back, DWC permuted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        if isinstance(a, LiTAttention):
            q, k, v = a.project(x)
            return a.proj(merge_heads(linear_attention(q, k, v)) + a.local_term(v, GRID))
        q, k, v = a.project(x, GRID)
        return a.proj(merge_heads(linear_attention(q, k, v)))


def _export(module: nn.Module, x: torch.Tensor, path) -> onnx.ModelProto:
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(str(path))


def _ort_optimized(path, tmp_path) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath), session


def _counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(params=["lit", "edit"])
def attention(request) -> tuple[str, nn.Module]:
    torch.manual_seed(7)
    attn = LiTAttention(WIDTH, heads=2) if request.param == "lit" else EDiTAttention(WIDTH, heads=4)
    return request.param, attn.eval()


def test_channel_first_layout_keeps_parity_and_drops_layout_nodes(attention, tmp_path):
    name, attn = attention
    torch.manual_seed(8)
    x = torch.randn(BATCH, GRID[0] * GRID[1], WIDTH)
    with torch.no_grad():
        ref = _ReferenceLayout(attn)(x).double().numpy()
        exact = (lit_reference(attn, x, GRID) if name == "lit" else edit_reference(attn, x, GRID)).numpy()
    assert _rel(ref, exact) < 1e-5  # the reference layout is itself right (float64, N x M matrix)

    counts = {}
    for layout, module in (("before", _ReferenceLayout(attn)), ("after", _WithGrid(attn))):
        path = tmp_path / f"{name}-{layout}.onnx"
        graph = _export(module, x, path)
        optimized, session = _ort_optimized(path, tmp_path)
        got = session.run(None, {"x": x.numpy()})[0]
        assert _rel(got, ref) < 1e-4, layout  # fp32 onnxruntime vs PyTorch's reference layout
        assert _rel(session.run(None, {"x": x[:1].numpy()})[0], ref[:1]) < 1e-4  # dynamic batch
        counts[layout] = (_counts(graph), _counts(optimized))

    (before, before_opt), (after, after_opt) = counts["before"], counts["after"]
    print(name, {op: (before[op], after[op], before_opt[op], after_opt[op]) for op in LAYOUT_OPS})
    # Exported graph, Transposes before -> after: LiT 8 -> 5, EDiT 12 -> 6.
    assert (before["Transpose"], after["Transpose"]) == {"lit": (8, 5), "edit": (12, 6)}[name]
    # What onnxruntime runs (its optimizer merges and fuses what it can into FusedMatMul): LiT 7 -> 3,
    # EDiT 11 -> 4 Transposes; its own transpose fusions do not recover what the layout removes.
    assert before_opt["Transpose"] == {"lit": 7, "edit": 11}[name]
    assert after_opt["Transpose"] <= {"lit": 3, "edit": 4}[name]
    assert after_opt["Mul"] < before_opt["Mul"]  # the 1/sqrt(M) scalings of keys and values: one 1/M
    assert sum(after_opt.values()) < sum(before_opt.values())
    assert after["MatMul"] == before["MatMul"]  # the same matmul work


def test_channel_first_kernel_equals_token_major():
    """The kernel alone, including the fp32 sums under bf16 autocast."""
    torch.manual_seed(9)
    q, k = torch.rand(2, 3, 40, 16), torch.rand(2, 3, 24, 16)
    v = torch.randn(2, 3, 24, 8)
    ref = linear_attention(q, k, v)
    got = linear_attention_channels(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1))
    assert got.shape == (2, 3, 8, 40)
    assert _rel(got.transpose(-2, -1).numpy(), ref.double().numpy()) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_attention_channels(q.transpose(-2, -1).bfloat16(), k.transpose(-2, -1).bfloat16(),
                                        v.transpose(-2, -1).bfloat16())
    assert low.dtype == torch.bfloat16 and _rel(low.float().transpose(-2, -1).numpy(), ref.double().numpy()) < 2e-2
