"""cuda and directml targets: fp16 graphs with fp32 islands, static buckets, parity with PyTorch.

No CUDA or DirectML EP here: every graph is checked with onnx.checker and run on the CPU EP.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from litedge.bundle import is_bundle, verify_bundle
from litedge.cli.export import main
from litedge.export.fp16_backend import STATIC_TEXT_LENGTH, fp16_emulation
from litedge.models.configs import build_model
from litedge.models.student import save_transformer
from tests.export.test_cli_export import _onnx_feed
from tests.models.test_linearize import forward_inputs, randomize
from tests.runtime.fixtures import make_tiny_pixart_pipeline

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _export(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _types(path):
    """Tensor name -> element type of a saved graph (path form: external data allowed)."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return model, types


def _check_precision(path, *, linear_attention: bool):
    """Layers with weights compute in fp16; activation x activation MatMuls of the linear attention in fp32."""
    model, types = _types(path)
    weights = {t.name for t in model.graph.initializer}
    heavy = [n for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits", "Conv", "LayerNormalization")
             and len(n.input) > 1 and n.input[1] in weights]
    assert heavy and all(types[n.input[0]] == F16 for n in heavy), [n.name for n in heavy if types[n.input[0]] != F16]
    assert all(i.type.tensor_type.elem_type in (F32, TensorProto.INT64) for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == F32 for o in model.graph.output)
    if not linear_attention:
        return
    read_by = {}
    for n in model.graph.node:
        for i in n.input:
            read_by.setdefault(i, []).append(n)
    def scope_ops(op):
        return {n.name.rpartition("/")[0] for n in model.graph.node if n.op_type == op}

    scopes = scope_ops("ReduceMean") & scope_ops("Reciprocal")  # the key mean and the normalizer
    assert scopes
    for scope in scopes:
        mm = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.rpartition("/")[0] == scope
              and not set(n.input) & weights]

        def matmuls_reading(tensor):
            found = []
            for r in read_by.get(tensor, []):
                found += [r] if r.op_type == "MatMul" else matmuls_reading(r.output[0]) if r.op_type == "Cast" else []
            return found

        # K^T V is the MatMul whose product feeds another MatMul, Q (K^T V); the SDPA MatMuls
        # MM-EDiT keeps for text pairs may stay fp16
        ktv = [(n, matmuls_reading(n.output[0])) for n in mm if matmuls_reading(n.output[0])]
        assert len(ktv) == 1, scope
        for n in [ktv[0][0], *ktv[0][1]]:
            assert all(types[i] == F32 for i in n.input), (scope, n.name)
        for op in ("ReduceMean", "Reciprocal"):
            nodes = [n for n in model.graph.node if n.op_type == op and n.name.rpartition("/")[0] == scope]
            assert nodes and all(types[n.output[0]] == F32 for n in nodes), (scope, op)


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name, weights", [("tiny-LiT-T2I-XL", "fp"), ("tiny-LiT-T2I-XL", "int4"),
                                           ("tiny-MM-EDiT-SD3.5-Medium", "fp")])
def test_cuda_transformer_is_fp16_with_fp32_linear_attention(name, weights, tmp_path, capsys):
    model = randomize(build_model(name), seed=2)
    save_transformer(model, tmp_path / "student")
    out = tmp_path / "m.litedge"
    code, err = _export([tmp_path / "student", "--target", "cuda", "--weights", weights, "-o", out], capsys)
    assert code == 0, err
    manifest = verify_bundle(out)
    entry = manifest.components["transformer"]
    assert entry.shapes == "dynamic" and entry.meta["precision"] == "fp16" and entry.meta["weights"] == weights
    assert entry.inputs["sample"]["dtype"] == "float32"
    _check_precision(out / entry.file, linear_attention=True)

    # a size the graph was not traced at, non-square, against PyTorch fp32 (CPU EP)
    kw = forward_inputs(model, height=8, width=12)
    with torch.no_grad():
        ref = model(**kw).sample.numpy()
    got = ort.InferenceSession(str(out / entry.file), providers=["CPUExecutionProvider"]).run(None, _onnx_feed(model, kw))[0]
    rel = _rel(got, ref)
    fid = manifest.fidelity["transformer"]
    print(f"{name} cuda {weights}: CPU EP rel_err {rel:.3g}; manifest fp16 {fid['rel_err']:.3g} "
          f"(CPU EP {fid['cpu_ep']['rel_err']:.3g})")
    assert fid["rel_err"] < 5e-3 and fid["vs"] == "torch-fp32"
    if weights == "fp":
        assert rel < 5e-3
    else:
        assert entry.meta["quantization"]["left_fp32"] == {}
        assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(out / entry.file)).graph.node)
        assert 0 < rel < 0.3 and 0 < manifest.fidelity["transformer_int4"]["rel_err"] < 0.3


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pixart", linear=True)


@pytest.mark.slow  # ~35 s: a whole tiny pipeline (300-token T5) in fp16
def test_cuda_pipeline_fp16_every_component(pipeline, tmp_path, capsys):
    out = tmp_path / "c.litedge"
    code, err = _export([pipeline, "--target", "cuda", "-o", out], capsys)  # default weights: int4
    assert code == 0, err
    manifest = verify_bundle(out)
    assert manifest.target["precision"] == "fp16" and manifest.target["weights"] == "int4-block32"
    for name in ("transformer", "vae_decoder", "text_encoder"):
        entry = manifest.components[name]
        assert entry.meta["precision"] == "fp16", name
        _check_precision(out / entry.file, linear_attention=name == "transformer")
        print(f"cuda {name}: fp16 rel_err {manifest.fidelity[name]['rel_err']:.3g} (emulated), "
              f"{manifest.fidelity[name]['cpu_ep']['rel_err']:.3g} (CPU EP)")
        assert manifest.fidelity[name]["rel_err"] < 2e-2


@pytest.mark.slow  # ~35 s: a whole tiny pipeline (300-token T5) in fp16
def test_directml_static_bucket_graphs(pipeline, tmp_path, capsys):
    out = tmp_path / "d.litedge"
    code, err = _export([pipeline, "--target", "directml", "--weights", "fp", "--sizes", "64,96", "-o", out], capsys)
    assert code == 0, err
    manifest = verify_bundle(out)
    length = STATIC_TEXT_LENGTH["pixart"]
    t = manifest.components["transformer"]
    assert t.shapes == [[64, 64], [96, 96]]
    assert t.meta["buckets"] == {"64x64": t.file, "96x96": t.extra_files[0]["file"]}
    assert t.meta["batch"] == 2 and t.meta["text_length"] == length
    assert t.inputs["sample"]["shape"] == [2, 4, 8, 8] and t.inputs["encoder_hidden_states"]["shape"][:2] == [2, length]
    v = manifest.components["vae_decoder"]
    assert v.shapes == t.shapes and v.meta["buckets"] == {"64x64": v.file, "96x96": v.extra_files[0]["file"]}
    assert manifest.components["text_encoder"].inputs["input_ids"]["shape"] == [2, length]

    for key, file in t.meta["buckets"].items():
        _check_precision(out / file, linear_attention=True)
        latent = int(key.split("x")[0]) // 8
        session = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in session.get_inputs()}
        assert shapes["sample"] == [2, 4, latent, latent] and all(isinstance(d, int) for s in shapes.values() for d in s)
        print(f"directml transformer {key}: fp16 rel_err {manifest.fidelity['transformer@' + key]['rel_err']:.3g}")
        assert manifest.fidelity["transformer@" + key]["rel_err"] < 5e-3
    for key, file in v.meta["buckets"].items():
        image = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"]).get_outputs()[0].shape
        assert image == [1, 3, int(key.split("x")[0]), int(key.split("x")[1])]
    meta = json.loads((out / "manifest.json").read_text())["components"]["transformer"]["meta"]
    assert set(meta["bucket_meta"]) == {"64x64", "96x96"}


def test_directml_refuses_missing_sizes(tmp_path, capsys):
    out = tmp_path / "x.litedge"
    code, err = _export(["--config", "tiny-LiT-T2I-XL", "--random-weights", "--target", "directml", "-o", out], capsys)
    assert code == 2 and "directml needs static shapes: pass --sizes 512,1024" in err and err.count("\n") == 1
    assert not is_bundle(out) and not out.exists()


def test_fp16_emulation_rounds_between_ops():
    """The CPU EP drops fp16 rounding between ops; the emulation keeps it (1 + 4e-4 - 1 == 0 in fp16)."""
    h = onnx.helper
    x, y = (h.make_tensor_value_info(n, F16, [1]) for n in "xy")
    graph = h.make_graph([h.make_node("Add", ["x", "y"], ["s"], name="add"), h.make_node("Sub", ["s", "x"], ["o"], name="sub")],
                         "g", [x, y], [h.make_tensor_value_info("o", F16, [1])],
                         value_info=[h.make_tensor_value_info("s", F16, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    feeds = {"x": np.array([1.0], np.float16), "y": np.array([4e-4], np.float16)}
    direct = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    emulated_model = fp16_emulation(model)
    emulated_model.graph.input[0].type.tensor_type.elem_type = F32
    emulated_model.graph.input[1].type.tensor_type.elem_type = F32
    emulated_model.graph.output[0].type.tensor_type.elem_type = F32
    session = ort.InferenceSession(emulated_model.SerializeToString(), providers=["CPUExecutionProvider"])
    emulated = session.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]
    assert direct[0] != 0  # what the CPU EP computes
    assert emulated[0] == 0  # what fp16 hardware computes
