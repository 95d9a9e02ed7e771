"""Pipeline against diffusers' PixArtSigmaPipeline, determinism, memory modes, metadata."""

import logging

import numpy as np
import pytest
import torch

from litedge.errors import LitedgeError
from litedge.runtime import Pipeline, read_metadata, save_png
from tests.runtime.fixtures import TEXT_MAX_LENGTH, diffusers_pipeline

PROMPT = "a red fox in the snow"


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (B, H, W, 3) in [0, 1]


@pytest.fixture(scope="module")
def reference(pixart_pipeline_dir):
    return diffusers_pipeline(pixart_pipeline_dir)


@pytest.mark.parametrize("scheduler, guidance, batch", [
    ("dpmsolver++", 4.5, 1), ("dpmsolver++", 1.0, 1), ("dpmsolver++", 4.5, 2), ("ddim", 4.5, 1)])
def test_matches_diffusers_pixart_sigma(pixart_bundle, reference, scheduler, guidance, batch):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    latents = np.random.default_rng(7).standard_normal((batch, 4, 8, 12), dtype=np.float32)
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    ours = _pixels(pipe(PROMPT, height=64, width=96, steps=6, guidance_scale=guidance, batch=batch,
                        scheduler=scheduler, latents=latents, progress=False))
    cls = DDIMScheduler if scheduler == "ddim" else DPMSolverMultistepScheduler
    reference.scheduler = cls.from_config(reference.scheduler.config)
    with torch.no_grad():
        ref = reference(PROMPT, height=64, width=96, num_inference_steps=6, guidance_scale=guidance,
                        num_images_per_prompt=batch, latents=torch.from_numpy(latents), clean_caption=False,
                        use_resolution_binning=False, max_sequence_length=TEXT_MAX_LENGTH, output_type="np").images
    diff = np.abs(ours - ref)
    print(f"{scheduler} guidance {guidance} batch {batch}: mean |diff| {diff.mean() * 255:.3f}/255, "
          f"max {diff.max() * 255:.2f}/255, image std {ref.std():.3f}")
    assert ours.shape == ref.shape == (batch, 64, 96, 3)
    assert ref.std() > 0.05  # a real picture, not a flat one
    assert diff.mean() < 2 / 255


def test_prompt_and_guidance_change_the_image(pixart_bundle):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    base = _pixels(pipe(PROMPT, steps=3, progress=False))
    other = _pixels(pipe("a blue dog", steps=3, progress=False))
    unguided = _pixels(pipe(PROMPT, steps=3, guidance_scale=1.0, progress=False))
    assert np.abs(base - other).mean() > 1 / 255 and np.abs(base - unguided).mean() > 1 / 255


def test_same_seed_same_pixels_other_seed_other_pixels(pixart_bundle):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    a, b = (np.asarray(pipe(PROMPT, steps=3, seed=5, progress=False)[0]) for _ in range(2))
    c = np.asarray(Pipeline.from_bundle(pixart_bundle, device="cpu")(PROMPT, steps=3, seed=5, progress=False)[0])
    d = np.asarray(pipe(PROMPT, steps=3, seed=6, progress=False)[0])
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_low_memory_gives_the_same_pixels_and_holds_no_session(pixart_bundle):
    normal = Pipeline.from_bundle(pixart_bundle, device="cpu")
    low = Pipeline.from_bundle(pixart_bundle, device="cpu", low_memory=True)
    a = np.asarray(normal(PROMPT, steps=3, progress=False)[0])
    b = np.asarray(low(PROMPT, steps=3, progress=False)[0])
    assert np.array_equal(a, b)
    assert low._sessions == {}
    assert set(normal._sessions) == {"transformer", "vae_decoder"}  # text encoder released before denoising


def test_low_memory_holds_one_session_at_a_time(pixart_bundle, monkeypatch):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu", low_memory=True)
    seen = []
    original = pipe._session

    def spy(name):
        session = original(name)
        seen.append(sorted(pipe._sessions))
        return session

    monkeypatch.setattr(pipe, "_session", spy)
    pipe(PROMPT, steps=2, progress=False)
    assert seen and all(len(open_now) == 1 for open_now in seen)


def test_png_metadata_round_trip(pixart_bundle, tmp_path):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    image = pipe(PROMPT, negative_prompt="blurry", steps=2, seed=3, guidance_scale=3.0, progress=False)[0]
    path = save_png(image, tmp_path / "fox.png")
    meta = read_metadata(path)
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == "blurry" and meta["seed"] == 3
    assert meta["steps"] == 2 and meta["guidance_scale"] == 3.0 and (meta["height"], meta["width"]) == (64, 64)
    assert meta["scheduler"] == "DPMSolverMultistepScheduler" and meta["bundle"] == "pixart.litedge"
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed, none left


def test_too_long_prompt_is_truncated_with_a_warning(pixart_bundle, caplog):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    long_prompt = " ".join(["the red cat on the blue dog"] * 10)
    with caplog.at_level(logging.WARNING, logger="litedge"):
        image = pipe(long_prompt, steps=2, progress=False)[0]
    assert image.size == (64, 64)
    assert f"the model reads {TEXT_MAX_LENGTH}" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 72}, "multiple of 16"),
    ({"width": 0}, "multiple of 16"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"guidance_scale": -1.0}, "guidance scale must be a number >= 0"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"class_id": 3}, "text-to-image"),
    ({"scheduler": "euler-a"}, "unknown scheduler"),
    ({"latents": np.zeros((1, 4, 9, 8), np.float32)}, "latents: expected"),
    ({"null_caption": True}, "no null caption"),
])
def test_bad_requests_raise_one_line(pixart_bundle, kwargs, message):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    with pytest.raises(LitedgeError, match=message) as info:
        pipe(PROMPT, progress=False, **kwargs)
    assert "\n" not in str(info.value)
