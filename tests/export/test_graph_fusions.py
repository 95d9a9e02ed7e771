"""fuse_gelu_tanh: the exporter's tanh-GELU chain (and its bias Add) becomes one FastGelu, same outputs."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from litedge.export.graph_fusions import fuse_gelu_tanh
from litedge.export.onnx_io import cpu_session


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def _export(module, tmp_path) -> onnx.ModelProto:
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (torch.randn(2, 5, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], do_constant_folding=False)
    return onnx.load(str(path))


def test_chain_and_bias_become_one_fastgelu_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    module = _Mlp().eval()
    model = _export(module, tmp_path)
    x = torch.randn(2, 5, 16)  # the traced shape: the legacy exporter's graph is static
    assert fuse_gelu_tanh(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Tanh" not in ops and ops.count("FastGelu") == 1
    gelu = next(n for n in model.graph.node if n.op_type == "FastGelu")
    assert len(gelu.input) == 2  # the fc1 bias moved into FastGelu
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "fused.onnx"))
    got = cpu_session(tmp_path / "fused.onnx").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_gelu_whose_parts_are_read_elsewhere_is_left_alone(tmp_path):
    """A chain is fused only when nothing else reads its intermediates (here the tanh's output
    also feeds a second graph output); an erf GELU is not this pattern at all."""
    from onnx import helper

    model = _export(_Mlp().eval(), tmp_path)
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    model.graph.node.append(helper.make_node("Identity", [tanh.output[0]], ["tanh_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("tanh_copy", onnx.TensorProto.FLOAT, None))
    before = [n.op_type for n in model.graph.node]
    assert fuse_gelu_tanh(model) == 0
    assert [n.op_type for n in model.graph.node] == before

    erf = nn.Sequential(nn.Linear(16, 32), nn.GELU()).eval()
    assert fuse_gelu_tanh(_export(erf, tmp_path)) == 0


@pytest.mark.parametrize("name", ["tiny-LiT-T2I-XL"])
def test_cpu_transformer_export_uses_fastgelu(name, tmp_path, capsys):
    """The cpu target's transformer graph carries FastGelu (one per MLP, plus PixArt's caption
    projection) and still passes its parity check against PyTorch."""
    from litedge.bundle import verify_bundle
    from litedge.cli.export import main

    out = tmp_path / "b.litedge"
    assert main(["--config", name, "--random-weights", "-o", str(out)]) == 0, capsys.readouterr().err
    manifest = verify_bundle(out)
    comp = manifest.components["transformer"]
    graph = onnx.load(str(out / comp.file), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("FastGelu") >= 2 and "Tanh" not in ops
    assert manifest.fidelity["transformer"]["rel_err"] < 1e-5  # vs PyTorch with the same (dequantized) weights
