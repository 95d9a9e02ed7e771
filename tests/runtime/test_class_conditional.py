"""Class-conditional (DiT-like) bundles: class id instead of prompt, null class = num_classes."""

import numpy as np
import pytest
import torch

from litedge.errors import LitedgeError
from litedge.runtime import Pipeline


def _torch_reference(pipeline_dir, latents, class_id, steps, guidance):
    """The DiT sampling loop in diffusers' components: CFG with the null class 1000, learned sigma dropped."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    from litedge.models.loading import load_model

    model = load_model(pipeline_dir).transformer.eval()
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(pipeline_dir / "scheduler")
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents)
    labels = torch.tensor([1000, class_id])  # uncond first
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample[:, :4]
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        image = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    return (image / 2 + 0.5).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) in [0, 1]


def test_matches_a_diffusers_dit_loop(dit_bundle, dit_pipeline_dir):
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    pipe = Pipeline.from_bundle(dit_bundle, device="cpu")
    ours = np.asarray(pipe(class_id=207, steps=5, guidance_scale=4.0, latents=latents, progress=False)[0]) / 255
    ref = _torch_reference(dit_pipeline_dir, latents, 207, 5, 4.0)[0]
    diff = np.abs(ours - ref)
    print(f"DiT: mean |diff| {diff.mean() * 255:.3f}/255, max {diff.max() * 255:.2f}/255, std {ref.std():.3f}")
    assert ref.std() > 0.05 and diff.mean() < 2 / 255


def test_class_changes_the_image_and_feeds_the_null_class(dit_bundle, monkeypatch):
    pipe = Pipeline.from_bundle(dit_bundle, device="cpu")
    a = np.asarray(pipe(class_id=1, steps=2, progress=False)[0], dtype=float)
    b = np.asarray(pipe(class_id=2, steps=2, progress=False)[0], dtype=float)
    assert np.abs(a - b).mean() > 1
    fed = []
    session = pipe._session("transformer")
    run = session.run
    monkeypatch.setattr(session, "run", lambda **feeds: fed.append(feeds["class_labels"].tolist()) or run(**feeds))
    pipe(class_id=5, steps=1, batch=2, progress=False)
    pipe(class_id=5, steps=1, guidance_scale=1.0, progress=False)
    assert fed == [[1000, 1000, 5, 5], [5]]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "class id must be an integer in \\[0, 1000\\)"),
    ({"class_id": 1000}, "class id must be an integer"),
    ({"class_id": 3, "prompt": "a cat"}, "not a prompt"),
])
def test_bad_class_requests(dit_bundle, kwargs, message):
    with pytest.raises(LitedgeError, match=message):
        Pipeline.from_bundle(dit_bundle, device="cpu")(progress=False, **kwargs)


def test_cli_class_id(dit_bundle, tmp_path, capsys):
    from litedge.cli.generate import main
    from litedge.runtime import read_metadata

    code = main(["--bundle", str(dit_bundle), "--class", "207", "--steps", "2", "--quiet", "--output-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(tmp_path / "class-207-0-0.png")["class_id"] == 207
