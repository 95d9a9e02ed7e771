"""Streamed export (litedge.export.streaming): same graphs as the in-memory export, bounded memory, clear refusals.

References: the in-memory one-shot export (``litedge.export.onnx_export``) and PyTorch forwards of the
real model; memory as the exporting process's VmHWM (``ru_maxrss``) in a subprocess.
"""

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from litedge.bundle import verify_bundle
from litedge.cli.export import main as export_main
from litedge.export.onnx_export import export_text_encoder, export_transformer
from litedge.export.onnx_io import compare, cpu_session
from litedge.export.specs import SampleSize, text_encoder_wrapper, transformer_wrapper
from litedge.export.streaming import export_streamed
from litedge.export.weight_writer import WeightFormat, dequantize_blocks, quantize_blocks
from litedge.models.configs import build_model, get_config
from litedge.models.random_pipeline import build_random_pipeline, text_parts, write_text_encoder
from litedge.models.weights import ModuleWeights
from tests.cli import run_main

ROOT = Path(__file__).resolve().parents[2]


def _cli(argv, capsys):
    code, _, err = run_main(export_main, argv, capsys)
    return code, err


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary names litedge writes next to an output (none may survive a failed export)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("name", ["tiny-LiT-T2I-XL", "tiny-MM-EDiT-SD3.5-Medium", "tiny-LiT-XL/2"])
def test_streamed_fp32_graph_equals_the_one_shot_export(name, tmp_path):
    model = build_model(name, seed=3)
    wrapper = transformer_wrapper(model)
    one_shot = export_transformer(model, tmp_path / "one.onnx")
    from litedge.export.rewrites import dynamic_pos_embed

    streamed = export_streamed(
        "transformer", wrapper, ModuleWeights(model), tmp_path / "streamed.onnx", trace=SampleSize(2, 8, 8, 8),
        check_sizes=[SampleSize(1, 8, 8, 8)], opset=17, rewrite=lambda: dynamic_pos_embed(model))
    feeds = one_shot.sample_inputs  # the one-shot export's own check inputs
    a = cpu_session(tmp_path / "one.onnx").run(None, feeds)[0]
    b = cpu_session(tmp_path / "streamed.onnx").run(None, feeds)[0]
    assert compare(b, a)["rel_err"] < 1e-5
    assert streamed.fidelity["rel_err"] < 1e-5 and streamed.fidelity["vs"] == "torch-fp32"


def test_int4_graph_is_exact_against_pytorch_with_the_dequantized_weights(tmp_path):
    model = build_model("tiny-EDiT-PixArt-Sigma", seed=4)
    from litedge.export.rewrites import dynamic_pos_embed

    result = export_streamed(
        "transformer", transformer_wrapper(model), ModuleWeights(model), tmp_path / "q.onnx",
        trace=SampleSize(2, 8, 8, 8), check_sizes=[SampleSize(1, 8, 8, 8), SampleSize(2, 8, 12, 5)], opset=17,
        fmt=WeightFormat(bits=4), rewrite=lambda: dynamic_pos_embed(model), external_data=True)
    assert [p.name for p in result.files] == ["q.onnx", "q.onnx.data"]  # the path big models take
    assert result.fidelity["rel_err"] < 1e-5  # the graph is right: only int4 rounding separates it from fp32
    assert 1e-3 < result.fidelity["quantized"]["rel_err"] < 0.3  # and that rounding is reported
    assert result.metadata["quantization"]["left_fp32"] == {}
    import onnx

    # Node names keep their module paths (layer names for --keep-fp, lit-profile's op groups read them).
    names = [n.name for n in onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert names and all(n.startswith("/model/") or n.startswith("/proj_out/") for n in names), names[:5]


def test_block_dequantization_inverts_onnxruntime_matmulnbits():
    """dequantize_blocks is what MatMulNBits computes with: x @ W_deq equals onnxruntime's MatMulNBits(x)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 96, 40  # K not a multiple of the block: padding is exercised
    w = rng.standard_normal((k, n)).astype(np.float32)
    for bits in (4, 8):
        packed, scales = quantize_blocks(w, bits, 64)
        node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=64)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                                  [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        x = rng.standard_normal((3, k)).astype(np.float32)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        deq = dequantize_blocks(packed, scales, k, bits, 64)
        assert deq.shape == (k, n)
        assert np.abs(got - x @ deq).max() < 1e-4 * np.abs(got).max()
        assert np.abs(deq - w).max() < (0.6 if bits == 4 else 0.05) * np.abs(w).max()


# ----------------------------------------------------------------------------- T5-XXL widths, 2 layers

T5_XXL_2 = text_parts(get_config("LiT-T2I-XL"), tiny=False, seed=0, layers=2)[0].config
T5_XXL_2_FP32 = 4 * (2 * (4 * 4096 * 4096 + 3 * 4096 * 10240) + 32128 * 4096)  # bytes of its weights in fp32


@pytest.fixture(scope="module")
def t5_xxl_2(tmp_path_factory):
    """A T5 encoder with T5-XXL widths and 2 of its 24 layers, in bf16 shards of 256 MiB as checkpoints are stored."""
    folder = tmp_path_factory.mktemp("t5xxl") / "text_encoder"
    write_text_encoder(folder, "T5EncoderModel", T5_XXL_2, seed=0, dtype=torch.bfloat16, max_shard_bytes=256 * 2**20)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from litedge.export.specs import SampleSize, text_encoder_wrapper
    from litedge.export.streaming import export_streamed
    from litedge.export.weight_writer import WeightFormat
    from litedge.models.loading import open_text_encoder
    folder, out, bits = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    encoder, weights = open_text_encoder(folder, "T5EncoderModel")
    fmt = WeightFormat() if bits == "fp" else WeightFormat(bits=int(bits), block_size=64, embeddings=True)
    r = export_streamed("text_encoder", text_encoder_wrapper(encoder), weights, out, trace=SampleSize(2, 1, 1, 16),
                        check_sizes=[SampleSize(1, 1, 1, 16)], opset=17, fmt=fmt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "fidelity": {k: v for k, v in r.fidelity.items() if k != "checks"}}))
""")


def _child_export(folder: Path, out: Path, bits: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), bits], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_t5_xxl_widths_export_int4_in_less_memory_than_one_copy_of_the_model(t5_xxl_2, tmp_path):
    figures = _child_export(t5_xxl_2, tmp_path / "te.onnx", "4")
    print(f"T5-XXL widths, 2 layers, int4: peak RSS {figures['peak'] / 1e9:.2f} GB for {T5_XXL_2_FP32 / 1e9:.2f} GB "
          f"of fp32 weights; embedding rel err {figures['fidelity']['quantized']['rel_err']:.3g}")
    # Bound: 1.25x one fp32 copy of the model (measured 1.13x; the one-shot export needed ~5x). At 2 layers
    # the fixed part dominates: libraries (~0.4 GB), the 0.53 GB fp32 token table and, during the check, its
    # dequantized copy; each further layer costs one tensor at a time, not its 0.78 GB.
    assert figures["peak"] < 1.25 * T5_XXL_2_FP32
    assert figures["fidelity"]["rel_err"] < 1e-4  # exact against the dequantized weights
    # The int4 encoder's embeddings (last_hidden_state) vs fp32: within 15% of their largest value.
    assert figures["fidelity"]["quantized"]["rel_err"] < 0.15
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["te.onnx"] or files == ["te.onnx", "te.onnx.data"]


@pytest.mark.slow
def test_t5_xxl_widths_streamed_fp32_equals_one_shot_export(t5_xxl_2, tmp_path):
    """The streamed fp32 graph vs the in-memory export of the same weights (the latter needs ~5x the model)."""
    import transformers

    figures = _child_export(t5_xxl_2, tmp_path / "streamed.onnx", "fp")
    assert figures["peak"] < 1.6 * T5_XXL_2_FP32  # the fp32 check session holds one copy; the export adds little
    encoder = transformers.T5EncoderModel.from_pretrained(t5_xxl_2, torch_dtype=torch.float32).eval()
    one_shot = export_text_encoder(encoder, tmp_path / "one.onnx", check_sizes=[SampleSize(1, 1, 1, 16)])
    del encoder
    feeds = one_shot.sample_inputs
    a = cpu_session(tmp_path / "one.onnx").run(None, feeds)[0]
    b = cpu_session(tmp_path / "streamed.onnx").run(None, feeds)[0]
    assert compare(b, a)["rel_err"] < 1e-5


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("name", ["tiny-LiT-T2I-XL", "tiny-MM-EDiT-SD3.5-Medium"])
def test_random_weights_bundle_is_complete_and_generates_an_image(name, tmp_path, capsys):
    from PIL import Image

    from litedge.cli.generate import main as generate_main

    bundle = tmp_path / "r.litedge"
    code, err = _cli(["--config", name, "--random-weights", "-o", bundle], capsys)
    assert code == 0, err
    manifest = verify_bundle(bundle)
    encoders = [c for c in manifest.components if c.startswith("text_encoder")]
    assert "vae_decoder" in manifest.components and len(encoders) == (3 if "SD3" in name else 1)
    for enc in encoders:  # text encoders are int4 too, with their error vs fp32 recorded
        assert manifest.components[enc].meta["weights"] == "int4"
        assert 0 < manifest.fidelity[f"{enc}_int4"]["rel_err"] < 0.5
    assert _leftovers(tmp_path) == []  # the random pipeline was built in a work folder that is gone
    png = tmp_path / "out.png"
    assert generate_main(["a red circle", "--bundle", str(bundle), "--size", "64", "--steps", "2", "-o", str(png)]) == 0
    assert Image.open(png).size == (64, 64)

    # Every text encoder (SD3 has three) is released before the first denoising step.
    from litedge.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    open_during_steps = []
    pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64,
         callback_on_step_end=lambda p, i, t, kw: (open_during_steps.append(sorted(p._sessions)), {})[1])
    assert open_during_steps and all(not any(k.startswith("text_encoder") for k in keys) for keys in open_during_steps)


def test_text_encoder_weights_override(tmp_path, capsys):
    bundle = tmp_path / "o.litedge"
    code, err = _cli(["--config", "tiny-LiT-T2I-XL", "--random-weights", "--weights", "int4",
                      "--text-encoder-weights", "int8", "-o", bundle], capsys)
    assert code == 0, err
    manifest = verify_bundle(bundle)
    assert manifest.components["transformer"].meta["weights"] == "int4"
    assert manifest.components["text_encoder"].meta["weights"] == "int8"
    int8 = manifest.fidelity["text_encoder_int8"]["rel_err"]
    assert 0 < int8 < 0.05  # 8-bit blocks: far closer to fp32 than int4
    assert manifest.components["vae_decoder"].meta["weights"] == "fp"  # convolutions stay fp32, and say so


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture()
def sharded(tmp_path):
    """A tiny pipeline whose transformer is split into several shards with an index."""
    out = build_random_pipeline("tiny-LiT-T2I-XL", tmp_path / "src", max_shard_bytes=64 * 1024)
    index = out / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
    return out


def _refused(argv, capsys, tmp_path, *words):
    code, err = _cli(argv, capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and all(w in line for w in words), err
    assert _leftovers(tmp_path) == [], _leftovers(tmp_path)
    assert not (tmp_path / "o.litedge").exists()


def test_missing_shard_is_one_line(sharded, tmp_path, capsys):
    index = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / "transformer" / victim).unlink()
    _refused([sharded, "-o", tmp_path / "o.litedge"], capsys, tmp_path, victim, "download every shard")


def test_truncated_index_is_one_line(sharded, tmp_path, capsys):
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    _refused([sharded, "-o", tmp_path / "o.litedge"], capsys, tmp_path, "not a readable shard index")


def test_truncated_shard_is_one_line(sharded, tmp_path, capsys):
    index = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sharded / "transformer" / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _refused([sharded, "-o", tmp_path / "o.litedge"], capsys, tmp_path, shard.name, "cut short")


def test_shard_whose_shapes_disagree_with_the_config_is_one_line(sharded, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    index = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key, shard = next((k, v) for k, v in index["weight_map"].items() if k.endswith("proj_out.weight"))
    tensors = load_file(str(sharded / "transformer" / shard))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1], dtype=tensors[key].dtype)
    save_file(tensors, str(sharded / "transformer" / shard))
    _refused([sharded, "-o", tmp_path / "o.litedge"], capsys, tmp_path, "disagree with config.json")


@pytest.mark.parametrize("failure, words", [
    (MemoryError(), ("out of memory",)),
    (OSError(errno.ENOSPC, "No space left on device"), ("out of disk space",)),
])
def test_out_of_memory_or_disk_mid_export_is_one_line_and_leaves_nothing(failure, words, sharded, tmp_path, capsys,
                                                                         monkeypatch):
    import litedge.export.weight_writer as ww

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # a few tensors in: the bundle's temporary folder holds partial files
            raise failure
        return original(*args, **kwargs)

    original = ww._DataFile.tensor
    monkeypatch.setattr(ww._DataFile, "tensor", failing)
    _refused([sharded, "-o", tmp_path / "o.litedge"], capsys, tmp_path, *words)
