"""Pipeline.__call__ with diffusers' argument names: prompt lists, a generator per image, the step
callback and interrupt, output types, the new schedulers against PixArtSigmaPipeline, bad input."""

import numpy as np
import pytest
import torch

from litedge.errors import LitedgeError
from litedge.runtime import Pipeline, read_metadata, save_png
from litedge.runtime.pipeline import PipelineOutput
from tests.runtime.fixtures import TEXT_MAX_LENGTH, diffusers_pipeline

PROMPT = "a red fox in the snow"
OTHER = "a blue dog on the cat"
KW = dict(num_inference_steps=3, height=64, width=64, progress=False)


@pytest.fixture(scope="module")
def pipe(pixart_bundle):
    return Pipeline.from_bundle(pixart_bundle, device="cpu")


def test_seed_list_reproduces_each_image_alone(pipe):
    """Image i of a batch (prompt list, one generator each) equals a batch-1 run with generator i."""
    out = pipe(prompt=[PROMPT, OTHER], negative_prompt=["blurry", ""], generator=[3, np.random.default_rng(8)],
               output_type="np", **KW)
    assert isinstance(out, PipelineOutput) and out.images.shape == (2, 64, 64, 3)
    alone = [pipe(PROMPT, negative_prompt="blurry", generator=3, output_type="np", **KW).images[0],
             pipe(prompt=OTHER, generator=np.random.default_rng(8), output_type="np", **KW).images[0]]
    for i in range(2):
        np.testing.assert_allclose(out.images[i], alone[i], atol=1e-4)  # onnxruntime: batch 4 vs batch 2 rounding
    assert np.abs(out.images[0] - out.images[1]).mean() > 1 / 255


def test_images_per_prompt_with_seeds_and_the_older_names(pipe):
    """num_images_per_prompt=2 with seeds [5, 6]: image 1 is seed 6's alone, with litedge's older names too."""
    out = pipe(PROMPT, num_images_per_prompt=2, generator=[5, 6], **KW)
    assert [im.size for im in out] == [(64, 64)] * 2 and len(out) == 2
    assert [read_metadata_of(im)["seed"] for im in out.images] == [5, 6]
    second = pipe(PROMPT, steps=3, seed=6, height=64, width=64, progress=False)[0]  # litedge's names
    assert np.abs(np.asarray(out[1], np.float32) - np.asarray(second, np.float32)).max() <= 1
    # one seed for the whole batch draws the (B, C, h, w) block at once, as before
    block = pipe(PROMPT, batch=2, seed=5, **KW).latents
    same = pipe(PROMPT, num_images_per_prompt=2, generator=np.random.default_rng(5), **KW).latents
    np.testing.assert_array_equal(block, same)


def read_metadata_of(image) -> dict:
    import json

    return json.loads(image.info["litedge"])


def test_output_types_and_return_dict(pipe):
    pil = pipe(PROMPT, generator=1, **KW)
    assert pil.latents.shape == (1, 4, 8, 8) and pil.latents.dtype == np.float32
    assert pil[0] is pil.images[0] and list(pil) == pil.images
    arr = pipe(PROMPT, generator=1, output_type="np", **KW).images
    assert arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert np.abs(arr[0] * 255 - np.asarray(pil[0], np.float32)).max() <= 0.5 + 1e-3
    latent = pipe(PROMPT, generator=1, output_type="latent", **KW)
    np.testing.assert_array_equal(latent.images, pil.latents)
    (images,) = pipe(PROMPT, generator=1, return_dict=False, **KW)
    assert np.array_equal(np.asarray(images[0]), np.asarray(pil[0]))


def test_callback_sees_every_step_and_can_change_the_latents(pipe):
    seen = []

    def record(p, i, t, kwargs):
        assert p is pipe and kwargs["latents"].shape == (1, 4, 8, 8)
        seen.append((i, float(t)))
        return kwargs

    out = pipe(PROMPT, generator=2, callback_on_step_end=record, **KW)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == 999.0
    plain = pipe(PROMPT, generator=2, **KW)
    np.testing.assert_array_equal(out.latents, plain.latents)  # returning the kwargs changes nothing
    zeroed = pipe(PROMPT, generator=2, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0},
                  **KW)
    assert np.abs(zeroed.latents).max() == 0


@pytest.mark.parametrize("how", ["property", "diffusers"])
def test_callback_interrupts(pipe, how):
    steps = []

    def stop_after_two(p, i, t, kwargs):
        steps.append(i)
        if i == 1:
            if how == "property":
                p.interrupt = True
            else:
                p._interrupt = True  # diffusers' spelling
        return kwargs

    out = pipe(PROMPT, generator=4, num_inference_steps=6, height=64, width=64, progress=False,
               callback_on_step_end=stop_after_two)
    assert steps == [0, 1]
    assert read_metadata_of(out[0])["interrupted"] is True and pipe.interrupt is False  # reset after the call
    again = pipe(PROMPT, generator=4, **KW)  # the next call starts uninterrupted
    assert "interrupted" not in read_metadata_of(again[0])


def test_a_callback_that_raises_propagates_and_nothing_is_written(pixart_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    low = Pipeline.from_bundle(pixart_bundle, device="cpu", low_memory=True)

    def boom(p, i, t, kwargs):
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        low(PROMPT, callback_on_step_end=boom, **KW)
    assert list(tmp_path.iterdir()) == [] and low._sessions == {}
    with pytest.raises(LitedgeError, match="must return a dict"):
        low(PROMPT, callback_on_step_end=lambda *a: 3, **KW)
    assert len(low(PROMPT, **KW)) == 1  # still usable


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": [PROMPT, OTHER], "generator": [1, 2, 3]}, "generator has 3 entries for 2 images"),
    ({"prompt": [PROMPT], "num_images_per_prompt": 2, "generator": [1]}, "generator has 1 entries for 2 images"),
    ({"prompt": [PROMPT, OTHER], "negative_prompt": ["blurry"]}, "negative_prompt has 1 entries but prompt has 2"),
    ({"prompt": []}, "prompt must be a string or a non-empty list"),
    ({"prompt": [PROMPT, 3]}, r"prompt\[1\] must be a string"),
    ({"generator": torch.Generator()}, "use numpy.random.default_rng"),
    ({"num_images_per_prompt": 2, "generator": [1, -2]}, r"generator\[1\] must be an integer >= 0"),
    ({"generator": 1.5}, "seed must be an integer >= 0"),
    ({"steps": 3, "num_inference_steps": 3}, "either num_inference_steps or steps"),
    ({"seed": 1, "generator": 1}, "either generator or seed"),
    ({"output_type": "pt"}, "output_type 'pt'"),
    ({"callback_on_step_end": "nope"}, "must be callable"),
    ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, "only 'latents'"),
    ({"callback_on_step_end": lambda p, i, t, kw: {"latents": kw["latents"][:, :2]}}, "returned latents"),
])
def test_bad_calls_raise_one_line(pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(LitedgeError, match=message) as info:
        pipe(**kwargs)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the new schedulers in the loop

@pytest.fixture(scope="module")
def reference(pixart_pipeline_dir):
    return diffusers_pipeline(pixart_pipeline_dir)


@pytest.mark.parametrize("name, cls, extra", [
    ("euler", "EulerDiscreteScheduler", {}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("dpmsolver++-karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
])
def test_new_schedulers_match_diffusers_pixart_sigma(pipe, reference, name, cls, extra):
    """Euler's scaled model input and init_noise_sigma go through the same loop as diffusers' pipeline."""
    import diffusers

    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 12), dtype=np.float32)
    ours = pipe(PROMPT, height=64, width=96, num_inference_steps=6, scheduler=name, latents=latents,
                output_type="np", progress=False).images
    reference.scheduler = getattr(diffusers, cls).from_config({**reference.scheduler.config, **extra})
    with torch.no_grad():
        ref = reference(PROMPT, height=64, width=96, num_inference_steps=6, latents=torch.from_numpy(latents),
                        guidance_scale=4.5, clean_caption=False, use_resolution_binning=False,
                        max_sequence_length=TEXT_MAX_LENGTH, output_type="np").images
    diff = np.abs(ours - ref)
    print(f"{name}: mean |diff| {diff.mean() * 255:.3f}/255, max {diff.max() * 255:.2f}/255")
    assert ref.std() > 0.05 and diff.mean() < 2 / 255


def test_euler_ancestral_batch_image_equals_its_seed_alone(pipe, tmp_path):
    out = pipe(prompt=[PROMPT, OTHER], generator=[11, 12], scheduler="euler-ancestral", output_type="np", **KW)
    alone = pipe(OTHER, generator=12, scheduler="euler-ancestral", output_type="np", **KW).images[0]
    np.testing.assert_allclose(out.images[1], alone, atol=1e-4)
    image = pipe(PROMPT, generator=11, scheduler="euler-ancestral", **KW)[0]
    meta = read_metadata(save_png(image, tmp_path / "a.png"))
    assert meta["sampler"] == "Euler a" and meta["scheduler"] == "euler-ancestral" and meta["seed"] == 11


@pytest.mark.parametrize("name, sampler", [("euler", "Euler"), ("unipc", "UniPC")])
def test_lit_generate_takes_the_new_schedulers(pixart_bundle, tmp_path, capsys, name, sampler):
    from PIL import Image

    from litedge.cli.generate import main

    out = tmp_path / "a.png"
    code = main(["a cat", "--bundle", str(pixart_bundle), "--scheduler", name, "--steps", "2", "--size", "64",
                 "--quiet", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as png:
        assert f"Sampler: {sampler}," in png.info["parameters"]
    assert read_metadata(out)["scheduler"] == name


def test_every_prompt_of_a_list_is_checked(pipe):
    with pytest.raises(LitedgeError, match="a prompt of the list is not valid UTF-8"):
        pipe(prompt=[PROMPT, "bad \udcff"], num_inference_steps=1, progress=False)
    with pytest.raises(LitedgeError, match="a prompt of the list is not valid UTF-8"):
        pipe(prompt=[PROMPT, OTHER], negative_prompt=["", "\udcff"], num_inference_steps=1, progress=False)


def test_a_long_prompt_list_runs_the_text_encoder_once(pixart_bundle, monkeypatch):
    """Twelve different prompts (more than the encoding cache keeps between calls): one encoder run."""
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    runs = []
    original = pipe.conditioner.encode
    monkeypatch.setattr(pipe.conditioner, "encode", lambda texts: runs.append(len(texts)) or original(texts))
    prompts = [f"{a} {b}" for a in ("a red", "a blue", "the") for b in ("cat", "dog", "fox", "photo")]
    out = pipe(prompt=prompts, num_inference_steps=1, height=32, width=32, output_type="latent", progress=False)
    assert runs == [13] and out.latents.shape[0] == 12  # 12 prompts and the empty negative prompt


def test_per_image_seeds_for_a_class_conditional_bundle(dit_bundle):
    dit = Pipeline.from_bundle(dit_bundle, device="cpu")
    kw = dict(class_id=207, num_inference_steps=2, output_type="np", progress=False)
    out = dit(num_images_per_prompt=2, generator=[1, 2], **kw)
    np.testing.assert_allclose(out.images[1], dit(generator=2, **kw).images[0], atol=1e-4)


def test_sd3_prompt_list_with_pooled_projections(mmedit_bundle):
    """MM-EDiT: per-prompt CLIP pooled embeddings and joint states go with their own image."""
    sd3 = Pipeline.from_bundle(mmedit_bundle, device="cpu")
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", progress=False)
    out = sd3(prompt=["a red fox", "a blue cat"], negative_prompt=["", "a dog"], generator=[4, 5], **kw)
    np.testing.assert_allclose(out.images[1], sd3("a blue cat", negative_prompt="a dog", generator=5, **kw).images[0],
                               atol=1e-4)
    np.testing.assert_allclose(out.images[0], sd3("a red fox", generator=4, **kw).images[0], atol=1e-4)
