"""SD3 / MM-EDiT bundles: lit-export of the three text encoders, then the torch-free runtime
against diffusers' StableDiffusion3Pipeline (teacher, and the MM-EDiT student plugged into it)."""

import json
import shutil

import numpy as np
import pytest
import torch

from litedge.errors import LitedgeError
from litedge.runtime import Pipeline
from tests.runtime.fixtures import CLIP_MAX_LENGTH, SD3_TEXT_MAX_LENGTH, diffusers_sd3_pipeline

PROMPT = "a red fox in the snow"


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (B, H, W, 3) in [0, 1]


def _compare(bundle, reference, guidance: float, batch: int, negative: str = "") -> float:
    """Mean |ours - diffusers| in [0, 1] pixels from the same initial latents, 6 flow-matching steps."""
    latents = np.random.default_rng(7).standard_normal((batch, 16, 8, 12), dtype=np.float32)
    pipe = Pipeline.from_bundle(bundle, device="cpu")
    ours = _pixels(pipe(PROMPT, negative_prompt=negative, height=64, width=96, steps=6, guidance_scale=guidance,
                        batch=batch, latents=latents, progress=False))
    with torch.no_grad():
        ref = reference(PROMPT, negative_prompt=negative, height=64, width=96, num_inference_steps=6,
                        guidance_scale=guidance, num_images_per_prompt=batch, latents=torch.from_numpy(latents),
                        max_sequence_length=SD3_TEXT_MAX_LENGTH, output_type="np").images
    diff = np.abs(ours - ref)
    print(f"guidance {guidance} batch {batch}: mean |diff| {diff.mean() * 255:.3f}/255, "
          f"max {diff.max() * 255:.2f}/255, image std {ref.std():.3f}")
    assert ours.shape == ref.shape == (batch, 64, 96, 3)
    assert ref.std() > 0.05  # a real picture, not a flat one
    return float(diff.mean())


@pytest.fixture(scope="module")
def reference(sd3_pipeline_dir):
    return diffusers_sd3_pipeline(sd3_pipeline_dir)


@pytest.mark.parametrize("guidance, batch, negative", [(5.0, 1, ""), (1.0, 1, ""), (5.0, 2, "blurry dog")])
def test_sd3_matches_diffusers(sd3_bundle, reference, guidance, batch, negative):
    assert _compare(sd3_bundle, reference, guidance, batch, negative) < 2 / 255


def test_mmedit_student_without_t5_matches_diffusers(mmedit_bundle, mmedit_pipeline_dir):
    manifest = json.loads((mmedit_bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "mmedit" and "text_encoder_3" not in manifest["components"]
    assert _compare(mmedit_bundle, diffusers_sd3_pipeline(mmedit_pipeline_dir), 5.0, 1) < 2 / 255


def test_prompt_and_guidance_change_the_image(sd3_bundle):
    pipe = Pipeline.from_bundle(sd3_bundle, device="cpu")
    base = _pixels(pipe(PROMPT, steps=3, progress=False))
    other = _pixels(pipe("a blue dog", steps=3, progress=False))
    unguided = _pixels(pipe(PROMPT, steps=3, guidance_scale=1.0, progress=False))
    assert np.abs(base - other).mean() > 1 / 255 and np.abs(base - unguided).mean() > 1 / 255


def test_prompt_encoding_matches_diffusers_encode_prompt(sd3_bundle, reference):
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = reference.encode_prompt(
            PROMPT, None, None, negative_prompt="", max_sequence_length=SD3_TEXT_MAX_LENGTH)
    ours = Pipeline.from_bundle(sd3_bundle, device="cpu").encode_text(["", PROMPT])
    assert ours["encoder_hidden_states"].shape == (2, CLIP_MAX_LENGTH + SD3_TEXT_MAX_LENGTH, 32)
    np.testing.assert_allclose(ours["encoder_hidden_states"], torch.cat([neg, embeds]).numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["pooled_projections"], torch.cat([neg_pooled, pooled]).numpy(), atol=1e-5)


def test_manifest_names_three_encoders_and_tokenizers(sd3_bundle):
    manifest = json.loads((sd3_bundle / "manifest.json").read_text())
    model, components, tokenizer = manifest["model"], manifest["components"], manifest["tokenizer"]
    assert model["latent_channels"] == 16 and model["prediction_type"] == "flow"
    assert model["text_max_length"] == SD3_TEXT_MAX_LENGTH and model["clip_max_length"] == CLIP_MAX_LENGTH
    assert {"text_encoder", "text_encoder_2", "text_encoder_3"} <= set(components)
    assert set(components["text_encoder_2"]["outputs"]) == {"hidden_states", "text_embeds"}
    assert tokenizer["path"] == "tokenizer" and set(tokenizer["extra"]) == {"tokenizer_2", "tokenizer_3"}
    assert all(len(t["sha256"]) == 64 for t in [tokenizer, *tokenizer["extra"].values()])
    assert manifest["scheduler"]["type"] == "FlowMatchEulerDiscreteScheduler"
    clip_check = manifest["fidelity"]["text_encoder"]["checks"][0]  # both outputs checked against PyTorch
    assert set(clip_check["outputs"]) == {"hidden_states", "text_embeds"} and clip_check["rel_err"] < 1e-4


def test_sessions_after_generation_and_low_memory(sd3_bundle):
    pipe = Pipeline.from_bundle(sd3_bundle, device="cpu")
    low = Pipeline.from_bundle(sd3_bundle, device="cpu", low_memory=True)
    a = np.asarray(pipe(PROMPT, steps=2, progress=False)[0])
    b = np.asarray(low(PROMPT, steps=2, progress=False)[0])
    assert np.array_equal(a, b) and a.shape == (64, 64, 3)
    assert set(pipe._sessions) == {"transformer", "vae_decoder"} and low._sessions == {}


def test_a_modified_second_tokenizer_is_caught(sd3_bundle, tmp_path):
    copy = shutil.copytree(sd3_bundle, tmp_path / "sd3.litedge")
    with open(copy / "tokenizer_2" / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(LitedgeError, match="tokenizer_2.*sha256 mismatch"):
        Pipeline.from_bundle(copy, device="cpu")


def test_class_id_and_null_caption_are_refused(sd3_bundle):
    pipe = Pipeline.from_bundle(sd3_bundle, device="cpu")
    with pytest.raises(LitedgeError, match="text-to-image"):
        pipe(PROMPT, class_id=3, progress=False)
    with pytest.raises(LitedgeError, match="no null caption"):
        pipe(PROMPT, null_caption=True, progress=False)


def test_a_noise_prediction_scheduler_is_refused(sd3_bundle):
    with pytest.raises(LitedgeError, match="does not fit this bundle's flow-matching"):
        Pipeline.from_bundle(sd3_bundle, device="cpu")(PROMPT, scheduler="dpmsolver++", progress=False)
