"""lit-export --target coreml on a tiny pipeline: .mlpackage components, one function per bucket.

Conversion and compression run on Linux; Core ML prediction needs macOS, so these tests read
the saved programs (ops, ranks, int4 constants) instead of running them.
"""

import contextlib
import io
import json

import pytest

ct = pytest.importorskip(
    "coremltools", reason="coremltools is not installed: pip install 'litedge[coreml]' (needs numpy < 2.4)"
)

from litedge.bundle import verify_bundle  # noqa: E402
from litedge.cli.export import main  # noqa: E402
from litedge.errors import LitedgeError  # noqa: E402
from litedge.export.coreml_backend import MAX_RANK, buckets, summarize_program  # noqa: E402
from litedge.models.configs import build_model  # noqa: E402
from litedge.models.student import save_transformer  # noqa: E402
from tests.export.test_onnx_export import tiny_t5, tiny_vae  # noqa: E402
from tests.models.test_linearize import randomize  # noqa: E402

FUNCTIONS = {"64x64": "latent_8x8", "128x128": "latent_16x16"}


def _export(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _pipeline(root):
    """A tiny LiT student in a pipeline directory with a VAE, a T5 encoder and a tokenizer folder."""
    pipe = root / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    save_transformer(randomize(build_model("tiny-LiT-T2I-XL"), seed=2), pipe / "transformer")
    tiny_vae().save_pretrained(pipe / "vae")
    tiny_t5().save_pretrained(pipe / "text_encoder")
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "spiece.model").write_bytes(b"not a real tokenizer: only copied")
    return pipe


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    out = root / "lit.litedge"
    code, err = _export([_pipeline(root), "--target", "coreml", "--sizes", "64,128", "-o", out])
    assert code == 0, err
    return out, verify_bundle(out), err


def _load(path, function):
    return ct.models.MLModel(str(path), skip_model_load=True, function_name=function)


def test_bundle_has_one_mlpackage_per_component_and_a_function_per_bucket(bundle):
    out, manifest, _ = bundle
    parts = manifest.components
    assert {n: c.file for n, c in parts.items()} == {
        "transformer": "transformer.mlpackage", "vae_decoder": "vae_decoder.mlpackage",
        "text_encoder": "text_encoder.mlpackage",
    }
    assert all((out / c.file).is_dir() for c in parts.values())
    for name in ("transformer", "vae_decoder"):
        assert parts[name].shapes == [[64, 64], [128, 128]]
        assert parts[name].meta["functions"] == FUNCTIONS
        assert parts[name].meta["deployment_target"] == "iOS18"
    meta = parts["transformer"].meta
    assert meta["compute_precision"] == "float16" and meta["weights"] == "int4"
    # the linear-attention island stays fp32 (sums and the normalizer), the rest is fp16
    assert {"matmul", "reduce_mean", "inverse"} <= set(meta["fp32_ops"]) and "linear" not in meta["fp32_ops"]
    assert parts["transformer"].inputs["sample"]["shape"] == [2, 4, "height", "width"]
    assert parts["transformer"].inputs["encoder_attention_mask"] == {"dtype": "int32", "shape": [2, 300]}
    assert parts["vae_decoder"].outputs["image"]["shape"] == [1, 3, "image_height", "image_width"]
    assert parts["text_encoder"].meta["functions"] == {"text": "text_300"}
    assert json.loads((out / "manifest.json").read_text())["target"]["format"] == "coreml"


def test_prediction_check_is_skipped_with_its_reason_never_faked(bundle):
    _, manifest, err = bundle
    for name in ("transformer", "vae_decoder", "text_encoder"):
        assert manifest.fidelity[name] == {"skipped": "Core ML prediction needs macOS", "vs": "torch-fp32"}
        # what Linux can check: the converted trace equals eager PyTorch at every bucket
        trace = manifest.fidelity[f"{name}_trace"]
        assert trace["rel_err"] <= 1e-5
    assert [c["function"] for c in manifest.fidelity["transformer_trace"]["checks"]] == list(FUNCTIONS.values())
    assert "Core ML prediction needs macOS" in err


def test_packages_reload_per_function_with_the_manifest_interface(bundle):
    out, manifest, _ = bundle
    for name, component in manifest.components.items():
        for function in component.meta["functions"].values():
            spec = _load(out / component.file, function)._spec
            assert set(spec.mlProgram.functions) == set(component.meta["functions"].values())
            described = {f.name: f for f in spec.description.functions}[function]
            assert [i.name for i in described.input] == list(component.inputs)
            assert [o.name for o in described.output] == list(component.outputs)


def test_transformer_weights_are_int4_and_no_tensor_exceeds_rank_5(bundle):
    out, manifest, _ = bundle
    for component in manifest.components.values():
        for function in component.meta["functions"].values():
            summary = summarize_program(_load(out / component.file, function)._spec, function)
            assert summary.max_rank <= MAX_RANK, (component.file, function)
            if component.file == "transformer.mlpackage":
                assert summary.ops["constexpr_blockwise_shift_scale"] == len(summary.int4_weights) > 0
                assert "pixel_shuffle" in summary.ops  # the rank-4 unpatchify
    quant = manifest.components["transformer"].meta["quantization"]
    assert quant["block_size"] == 32 and quant["int4_weights"] > 0
    left = " ".join(quant["left_fp16"])
    # DESIGN: convs whose input dims do not divide the block stay fp16 (patch embedding, depthwise 5x5)
    assert "pos_embed_proj" in left and "attn1_dwc" in left and "not a multiple of 32" in left


def test_missing_sizes_is_refused_before_anything_is_written(tmp_path):
    code, err = _export(["--config", "tiny-LiT-T2I-XL", "--random-weights", "--target", "coreml",
                         "-o", tmp_path / "x.litedge"])
    assert code == 2 and "coreml needs resolution buckets: pass --sizes 512,1024" in err
    assert not (tmp_path / "x.litedge").exists()


def test_buckets_map_image_sizes_to_latent_functions():
    assert [(b.key, b.function) for b in buckets((1024, 512, 1024))] == [
        ("1024x1024", "latent_128x128"), ("512x512", "latent_64x64")]
    with pytest.raises(LitedgeError, match="multiple of the VAE factor 8"):
        buckets((100,))


@pytest.mark.slow
def test_fp_and_int4_sizes_and_weights_shared_across_functions(tmp_path):
    """int4 is smaller than fp16; a second bucket adds almost no weights (deduplicated)."""
    sizes = {}
    for weights, bucket_sizes in (("fp", "64"), ("fp", "64,128"), ("int4", "64,128")):
        out = tmp_path / f"{weights}-{bucket_sizes.replace(',', '_')}.litedge"
        code, err = _export(["--config", "tiny-LiT-T2I-XL", "--random-weights", "--target", "coreml",
                             "--weights", weights, "--sizes", bucket_sizes, "-o", out])
        assert code == 0, err
        blob = out / "transformer.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        sizes[weights, bucket_sizes] = blob.stat().st_size
    print("weight.bin bytes:", sizes)
    assert sizes["fp", "64,128"] < 1.2 * sizes["fp", "64"]
    assert sizes["int4", "64,128"] < 0.6 * sizes["fp", "64,128"]


def test_transformer_weights_are_released_after_the_last_trace_before_compression(tmp_path, monkeypatch):
    """At full size the PyTorch weights (2.4 GB for LiT-T2I-XL) must not sit beside the Core ML
    program while it is compressed and saved: released after the last bucket's conversion."""
    from litedge.export import coreml_backend

    events = []

    def convert(wrapper, size, convert=coreml_backend.convert_bucket, **kw):
        events.append(("convert", size.height, next(wrapper.parameters()).device.type))
        return convert(wrapper, size, **kw)

    def release(model, release=coreml_backend._release_weights):
        release(model)
        events.append(("release", {p.device.type for p in model.parameters()}))

    def compress(model, keep_fp=(), compress=coreml_backend.compress_int4):
        events.append(("compress",))
        return compress(model, keep_fp)

    monkeypatch.setattr(coreml_backend, "convert_bucket", convert)
    monkeypatch.setattr(coreml_backend, "_release_weights", release)
    monkeypatch.setattr(coreml_backend, "compress_int4", compress)
    student = tmp_path / "student"
    save_transformer(randomize(build_model("tiny-LiT-T2I-XL"), seed=2), student)
    out = tmp_path / "m.litedge"
    code, err = _export([student, "--target", "coreml", "--sizes", "64,128", "-o", out])
    assert code == 0, err
    assert events == [("convert", 8, "cpu"), ("compress",), ("convert", 16, "cpu"), ("release", {"meta"}),
                      ("compress",)]
    fn = verify_bundle(out).components["transformer"].meta["functions"]
    assert fn == FUNCTIONS
    for function in FUNCTIONS.values():
        assert summarize_program(_load(out / "transformer.mlpackage", function)._spec, function).int4_weights


def test_text_encoder_past_the_whole_conversion_limit_streams_to_onnx(tmp_path, monkeypatch):
    """A T5 past WHOLE_TEXT_ENCODER_BYTES (T5-XXL's 19 GB at full size; lowered here) is not converted
    whole to Core ML: it is the streamed ONNX export with int4 MatMulNBits, whose graph onnxruntime runs
    and matches the PyTorch encoder within int4 error; the transformer stays a Core ML package."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from litedge.export import coreml_backend

    monkeypatch.setattr(coreml_backend, "WHOLE_TEXT_ENCODER_BYTES", 1000)
    out = tmp_path / "lit.litedge"
    code, err = _export([_pipeline(tmp_path), "--target", "coreml", "--weights", "int4", "--sizes", "64", "-o", out])
    assert code == 0, err
    assert "streamed ONNX export for onnxruntime instead" in err
    manifest = verify_bundle(out)
    text = manifest.components["text_encoder"]
    assert text.file == "text_encoder.onnx" and text.meta["format"] == "onnx"
    assert text.meta["weights"] == "int4"
    assert manifest.components["transformer"].file == "transformer.mlpackage"
    graph = onnx.load(str(out / "text_encoder.onnx"), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    ids = np.random.default_rng(0).integers(0, 64, (1, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    got = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = tiny_t5()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert got.shape == ref.shape and 0 < rel < 0.3, rel  # int4 weights: close, not exact
