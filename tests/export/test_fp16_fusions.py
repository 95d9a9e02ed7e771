"""cuda target: fuse in fp32 first, then convert to fp16 (onnxruntime's SD demo order).

The fp16 graph must keep every fusion the fp32 graph gets (node counts before and after),
where converting first (the old order) loses them; the fused fp32 graph keeps parity
with PyTorch (< 1e-4), and the fp32 islands of the linear attention survive the fusion.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL
from onnx import TensorProto

from litedge.export.fp16_backend import convert_to_fp16, fp32_islands, fuse_fp32, fused_op_counts
from litedge.export.onnx_export import export_transformer, export_vae_decoder
from litedge.models.configs import build_model
from tests.models.test_linearize import randomize


def _inferred(path):
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusions")
    student = randomize(build_model("tiny-LiT-T2I-XL"), seed=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4).eval()
    transformer = export_transformer(student, root / "transformer.onnx", sample_size=(16, 16))
    decoder = export_vae_decoder(vae, root / "vae.onnx", sample_size=(8, 8))
    return root, transformer, decoder


def test_fp16_graph_keeps_the_fp32_fusions(graphs):
    root, transformer, decoder = graphs
    for result, component, cuda_only, expected in ((transformer, "transformer", False, {"FastGelu", "SkipLayerNormalization"}),
                                                   (decoder, "vae_decoder", True, {"GroupNorm", "NhwcConv"})):
        fp32 = fused_op_counts(fuse_fp32(_inferred(result.path), component, cuda_only=cuda_only))
        assert expected <= set(fp32), fp32
        report = convert_to_fp16(result.path, root / f"{component}.fp16.onnx", fuse=component, cuda_only=cuda_only)
        fp16 = fused_op_counts(onnx.load(str(report.path)))
        assert fp16 == fp32 == report.fusions  # every fusion kept through the conversion
        # The old order, convert first and fuse after, finds (almost) none of them.
        plain = convert_to_fp16(result.path, root / f"{component}.plain.onnx")
        late = fused_op_counts(fuse_fp32(_inferred(plain.path), component, cuda_only=cuda_only))
        assert sum(late.get(op, 0) for op in expected) < sum(fp32[op] for op in expected), (late, fp32)


def test_fused_fp32_transformer_matches_the_unfused_graph(graphs, tmp_path):
    _, transformer, _ = graphs
    fused = fuse_fp32(_inferred(transformer.path), "transformer")
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    feed = transformer.sample_inputs
    ref = ort.InferenceSession(str(transformer.path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_linear_attention_islands_survive_the_fusion(graphs, tmp_path):
    _, transformer, _ = graphs
    model = _inferred(transformer.path)
    upcast = fp32_islands(model)["upcast"]
    assert upcast
    report = convert_to_fp16(transformer.path, tmp_path / "t.fp16.onnx", fuse="transformer")
    out = onnx.shape_inference.infer_shapes(onnx.load(str(report.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in out.graph.value_info}
    kept = [n for n in out.graph.node if n.name in upcast and n.op_type in ("MatMul", "ReduceMean")]
    assert kept and all(types.get(n.output[0]) == TensorProto.FLOAT for n in kept)
