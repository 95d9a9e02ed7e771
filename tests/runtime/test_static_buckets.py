"""Static-shape bundles (one graph per image size, fixed batch and prompt length) run in the runtime.

The tiny LiT PixArt pipeline of ``lit_bundle`` (tests/runtime/conftest.py) is exported again
for directml (fp16, buckets 64 and 128 px) and run on the CPU EP against its cpu fp32
dynamic bundle with the same seed (so the same latents).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from litedge.errors import LitedgeError
from litedge.runtime import Pipeline
from litedge.runtime.pipeline import _static_text_length
from tests.runtime.fixtures import TEXT_MAX_LENGTH

PROMPT = "a red fox in the snow"
MAX_MEAN_ABS = 1.0  # uint8 levels; fp16 vs fp32 measured ~0.03 (max 1 level) over 4 steps


@pytest.fixture(scope="module")
def directml_bundle(lit_bundle, tmp_path_factory) -> Path:
    from litedge.export.bundle_export import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("directml") / "lit-dml.litedge"
    export_bundle(ExportConfig(out=out, source=lit_bundle.parent / "pipeline", target="directml", weights="fp",
                               sizes=(64, 128), text_max_length=TEXT_MAX_LENGTH))
    return out


@pytest.fixture(scope="module")
def pipes(lit_bundle, directml_bundle):
    return Pipeline.from_bundle(lit_bundle, device="cpu"), Pipeline.from_bundle(directml_bundle, device="cpu")


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_the_bundle_is_static(directml_bundle):
    pipe = Pipeline.from_bundle(directml_bundle, device="cpu")
    transformer = pipe.manifest.components["transformer"]
    assert set(transformer.meta["buckets"]) == {"64x64", "128x128"}
    assert transformer.meta["batch"] == 2 and transformer.meta["text_length"] == TEXT_MAX_LENGTH
    assert pipe.manifest.components["vae_decoder"].meta["batch"] == 1
    assert pipe.manifest.components["text_encoder"].meta["batch"] == 2


@pytest.mark.parametrize("px", [64, 128])
@pytest.mark.parametrize(("guidance", "batch"), [(4.5, 1), (1.0, 3)])
def test_static_matches_dynamic_fp32(pipes, px, guidance, batch):
    """Each size picks its own graphs; guidance 1 and a batch the fixed graphs do not fit still work."""
    cpu, dml = pipes
    kw = dict(height=px, width=px, steps=3, guidance_scale=guidance, seed=7, batch=batch, progress=False)
    ref, got = _pixels(cpu(PROMPT, **kw)), _pixels(dml(PROMPT, **kw))
    assert got.shape == ref.shape == (batch, px, px, 3)
    diff = np.abs(got - ref)
    print(f"{px}px guidance {guidance} batch {batch}: fp16 static vs fp32 dynamic mean abs {diff.mean():.4f}, "
          f"max {diff.max():.0f} (uint8 levels)")
    assert diff.mean() < MAX_MEAN_ABS
    assert f"transformer@{px}x{px}" in dml._sessions and f"vae_decoder@{px}x{px}" in dml._sessions
    if batch > 1:  # different noise per image, not one image repeated
        assert np.abs(got[0] - got[1]).mean() > 1


def test_given_latents_match(pipes):
    cpu, dml = pipes
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    kw = dict(height=64, width=64, steps=3, batch=2, latents=latents, progress=False)
    assert np.abs(_pixels(cpu(PROMPT, **kw)) - _pixels(dml(PROMPT, **kw))).mean() < MAX_MEAN_ABS


def test_a_size_without_a_graph_is_refused(pipes):
    _, dml = pipes
    with pytest.raises(LitedgeError, match=r"exported for 64x64, 128x128: use one of those sizes or re-export "
                                           r"with --sizes"):
        dml(PROMPT, height=96, width=96, steps=1, progress=False)


def test_release_closes_every_bucket(directml_bundle):
    pipe = Pipeline.from_bundle(directml_bundle, device="cpu")
    for px in (64, 128):
        pipe(PROMPT, height=px, width=px, steps=1, progress=False)
    assert {k for k in pipe._sessions if k.startswith("transformer@")} == {"transformer@64x64", "transformer@128x128"}
    pipe.release("transformer")
    assert sorted(pipe._sessions) == ["vae_decoder@128x128", "vae_decoder@64x64"]
    low = Pipeline.from_bundle(directml_bundle, device="cpu", low_memory=True)
    low(PROMPT, height=128, width=128, steps=1, progress=False)
    assert low._sessions == {}


def test_long_prompts_are_cut_to_the_static_length_with_a_warning(pipes, caplog):
    _, dml = pipes
    with caplog.at_level(logging.WARNING):
        images = dml(" ".join(["red fox"] * 40), height=64, width=64, steps=1, progress=False)
    assert len(images) == 1
    assert any("the rest is ignored" in r.getMessage() for r in caplog.records)


def test_prompt_length_follows_the_static_graphs(directml_bundle):
    """The tokenizer pads to ``meta["text_length"]`` even where the model's text_max_length says otherwise."""
    from litedge.bundle import verify_bundle

    manifest = verify_bundle(directml_bundle)
    other = dataclasses.replace(manifest, model={**manifest.model, "text_max_length": 99})
    assert _static_text_length(other).model["text_max_length"] == TEXT_MAX_LENGTH
    assert _static_text_length(manifest) is manifest


@pytest.mark.slow
def test_snapdragon_int8_on_the_htp_simulator(lit_bundle, tmp_path):
    """A snapdragon bundle (EPContext transformer on QNN HTP, CPU text encoder and VAE) runs
    with device="qnn" on the x86 HTP simulator; int8 vs fp32: a few uint8 levels on average."""
    pytest.importorskip("onnxruntime_qnn")
    from litedge.export.bundle_export import ExportConfig, export_bundle

    out = tmp_path / "lit-qnn.litedge"
    export_bundle(ExportConfig(out=out, source=lit_bundle.parent / "pipeline", target="snapdragon", weights="int8",
                               sizes=(64,), text_max_length=TEXT_MAX_LENGTH))
    qnn, cpu = Pipeline.from_bundle(out, device="qnn"), Pipeline.from_bundle(lit_bundle, device="cpu")
    for guidance, batch in ((4.5, 1), (1.0, 1), (4.5, 2)):
        kw = dict(height=64, width=64, steps=4, guidance_scale=guidance, seed=0, batch=batch, progress=False)
        ref, got = _pixels(cpu(PROMPT, **kw)), _pixels(qnn(PROMPT, **kw))
        diff = np.abs(got - ref)
        print(f"qnn int8 guidance {guidance} batch {batch}: mean abs {diff.mean():.2f}, max {diff.max():.0f}")
        assert got.shape == ref.shape and diff.mean() < 8
    assert "QNNExecutionProvider" in qnn._sessions["transformer@64x64"].session.get_providers()
    with pytest.raises(LitedgeError, match="exported for 64x64: use one of those sizes"):
        qnn(PROMPT, height=128, width=128, steps=1, progress=False)
