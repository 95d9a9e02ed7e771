"""Unit tests of the runtime's pieces: devices, input checks, tokenizers, PNG writing."""

import io
import logging
import re

import numpy as np
import pytest
from PIL import Image

from litedge.bundle import verify_bundle
from litedge.errors import LitedgeError
from litedge.runtime.devices import DEVICES, resolve_device
from litedge.runtime.image import save_png, to_uint8
from litedge.runtime.session import ComponentSession
from litedge.runtime.text import PromptTokenizer

# ----------------------------------------------------------------------------- devices


def test_auto_picks_the_target_device_or_says_it_falls_back(caplog):
    assert resolve_device("auto", {"name": "cpu", "format": "onnx"}).name == "cpu"
    with caplog.at_level(logging.WARNING, logger="litedge"):
        assert resolve_device("auto", {"name": "cuda", "format": "onnx"}).name == "cpu"
    assert "targets cuda" in caplog.text and "running on cpu" in caplog.text


@pytest.mark.parametrize("device, target, message", [
    ("cuda", {"name": "cuda"}, "device 'cuda' is not available"),
    ("directml", {"name": "cpu"}, "onnxruntime-directml"),
    ("coreml", {"name": "cpu"}, "CoreMLExecutionProvider"),
    ("tpu", {"name": "cpu"}, "unknown device 'tpu'"),
    ("auto", {"name": "coreml", "format": "coreml"}, "Core ML packages"),
])
def test_unavailable_devices_are_errors_never_silent_cpu(device, target, message):
    with pytest.raises(LitedgeError, match=message):
        resolve_device(device, target)


@pytest.fixture
def no_qnn(monkeypatch):
    """Pretend onnxruntime-qnn is not installed (it is in the dev environment)."""
    import importlib.util

    import onnxruntime as ort

    real_find, real_providers, real_devices = importlib.util.find_spec, ort.get_available_providers, ort.get_ep_devices
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_qnn" else real_find(name, *a))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [p for p in real_providers() if "QNN" not in p])
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [d for d in real_devices() if "QNN" not in d.ep_name])


@pytest.mark.parametrize("device, target, message", [
    ("qnn", {"name": "snapdragon"}, "pip install 'litedge\\[qnn\\]' \\(onnxruntime-qnn\\)"),
    ("auto", {"name": "snapdragon", "format": "qnn"}, "QNN execution provider, which is not installed"),
])
def test_qnn_without_its_plugin_says_what_to_install(no_qnn, device, target, message):
    with pytest.raises(LitedgeError, match=message):
        resolve_device(device, target)


def test_every_device_names_its_provider():
    assert DEVICES["qnn"].plugin_package == "onnxruntime_qnn"
    assert all(d.provider.endswith("ExecutionProvider") and d.install for d in DEVICES.values())


# ----------------------------------------------------------------------------- sessions


@pytest.fixture(scope="module")
def transformer_session(pixart_bundle):
    manifest = verify_bundle(pixart_bundle)
    return ComponentSession.open(pixart_bundle, "transformer", manifest.components["transformer"], DEVICES["cpu"])


def _feeds(**change):
    feeds = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
             "encoder_hidden_states": np.zeros((2, 5, 32), np.float32),
             "encoder_attention_mask": np.ones((2, 5), np.int64)}
    feeds.update(change)
    return {k: v for k, v in feeds.items() if v is not None}


@pytest.mark.parametrize("change, message", [
    ({"sample": np.zeros((2, 4, 8, 8))}, re.escape("transformer input 'sample': expected float32 of rank 4 "
                                                   "(batch, 4, height, width), got float64 of shape (2, 4, 8, 8)")),
    ({"sample": np.zeros((2, 3, 8, 8), np.float32)}, "axis 1 must be 4"),
    ({"timestep": np.zeros(3, np.float32)}, "dimension 'batch' is 3"),
    ({"encoder_attention_mask": None}, "missing \\['encoder_attention_mask'\\]"),
    ({"class_labels": np.zeros(2, np.int64)}, "unexpected \\['class_labels'\\]"),
])
def test_inputs_are_checked_against_the_manifest(transformer_session, change, message):
    with pytest.raises(LitedgeError, match=message):
        transformer_session.run(**_feeds(**change))


def test_good_inputs_run(transformer_session):
    out = transformer_session.run(**_feeds())
    assert out.shape == (2, 8, 8, 8) and out.dtype == np.float32 and transformer_session.run_seconds > 0


def test_a_file_onnxruntime_cannot_load_is_one_line(pixart_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b.litedge"
    shutil.copytree(pixart_bundle, copy)
    (copy / "vae_decoder.onnx").write_bytes(b"not onnx")
    manifest = verify_bundle(copy, check_hashes=False)
    with pytest.raises(LitedgeError, match="onnxruntime cannot load vae_decoder.onnx on cpu") as info:
        ComponentSession.open(copy, "vae_decoder", manifest.components["vae_decoder"], DEVICES["cpu"])
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- tokenizers


def test_tokenizers_json_matches_transformers(pixart_pipeline_dir, pixart_bundle):
    from transformers import T5Tokenizer

    ref = T5Tokenizer.from_pretrained(pixart_pipeline_dir / "tokenizer")
    ours = PromptTokenizer.from_bundle(pixart_bundle, {"kind": "tokenizers", "path": "tokenizer"}, max_length=12)
    texts = ["  A Red Fox  ", "", "the cat " * 10]
    ids, mask = ours(texts)
    want = ref([t.lower().strip() for t in texts], padding="max_length", max_length=12, truncation=True)
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64


def test_sentencepiece_model(tmp_path, caplog):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red fox in the snow", "a blue dog on the grass", "the cat sat"] * 20),
        model_writer=model, vocab_size=22, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    tok = PromptTokenizer.from_bundle(tmp_path, {"kind": "sentencepiece", "path": "tokenizer"}, max_length=8)
    ids, mask = tok(["a red fox", "a red fox in the snow with a blue dog on the grass"])
    assert ids[0, mask[0].sum() - 1] == 1 and (ids[0, mask[0].sum():] == 0).all()  # </s>, then padding
    assert mask[1].all() and ids[1, -1] == 1  # truncated, </s> kept last
    assert "the rest is ignored" in caplog.text


def test_bundle_without_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(LitedgeError, match="neither tokenizer.json nor spiece.model"):
        PromptTokenizer.from_bundle(tmp_path, {"kind": "sentencepiece", "path": "tokenizer"}, 8)


# ----------------------------------------------------------------------------- images


def test_to_uint8_rounds_like_diffusers():
    images = np.array([-1.0, -0.5, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]


def test_save_png_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    image = Image.new("RGB", (4, 4))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(LitedgeError, match="No space left"):
        save_png(image, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
