"""ShapesEval of demo *training checkpoints* in PyTorch: the learning curve of a teacher run.

Samples each checkpoint's EMA transformer with diffusers' DPMSolverMultistepScheduler (the
bundle's scheduler) and classifier-free guidance, on *tuning* prompts (training captions in
new layouts, never the held-out evaluation prompts), decodes with the build's autoencoder,
and scores with ShapesEval. No export needed, so it runs while training goes on.

    python bench/demo_checkpoint_curve.py --workdir /work/demo2 --steps 1500,3000 --sizes 256 --prompts 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def sample(transformer, table, mask, caption_rows, size: int, steps: int, guidance: float, seed: int, ae, p):
    """One image per caption row (index into ``table``) -> list of uint8 (size, size, 3) arrays."""
    from diffusers import DPMSolverMultistepScheduler

    from litedge.demo.training import PIXART_SIGMA_SCHEDULER
    from litedge.distill.losses import split_learned_sigma

    scheduler = DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER)
    n = size // p.vae_factor
    images = []
    for i, row in enumerate(caption_rows):
        scheduler.set_timesteps(steps)  # resets the multistep state
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(1, p.ae_latent_channels, n, n, generator=g)
        text = torch.cat([table[:1], table[row:row + 1]])
        m = torch.cat([mask[:1], mask[row:row + 1]])
        for t in scheduler.timesteps:
            out = transformer(hidden_states=torch.cat([x, x]), timestep=t.repeat(2), encoder_hidden_states=text,
                              encoder_attention_mask=m, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                              return_dict=False)[0]
            eps, _ = split_learned_sigma(out, p.ae_latent_channels)
            eps = eps[:1] + guidance * (eps[1:] - eps[:1])
            x = scheduler.step(eps, t, x).prev_sample
        image = ae.decode(x / ae.config.scaling_factor).sample.clamp(-1, 1)
        images.append(((image[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return images


def main() -> None:
    from diffusers import AutoencoderDC
    from safetensors.torch import load_file

    from litedge.demo import build as B
    from litedge.demo import training as T
    from litedge.demo.shapes import tuning_prompts
    from litedge.demo.shapes_eval import ShapesEval

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", required=True, help="checkpoint steps, comma-separated (e.g. 1500,3000)")
    ap.add_argument("--sizes", default="256", help="image sizes, comma-separated")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p, paths = T.PRESETS["full"], B.Paths(args.workdir)
    captions = [s.caption for s in tuning_prompts(args.prompts, 0)]
    cfg = B.BuildConfig(workdir=args.workdir, progress=False)
    table, mask, rows = B._caption_features(cfg, paths, captions)
    ae = AutoencoderDC.from_pretrained(paths.stage("vae")).eval()
    judge = ShapesEval()
    print("| checkpoint | size | overall | single | two | counting | colours | position | s/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for step in (int(s) for s in args.steps.split(",")):
        transformer = T.make_teacher(p).eval()
        ckpt = paths.run("teacher") / "checkpoints" / f"step-{step:06d}" / "ema.safetensors"
        state = {k.removeprefix("transformer."): v for k, v in load_file(ckpt).items()}
        transformer.load_state_dict(state)
        for size in (int(s) for s in args.sizes.split(",")):
            start = time.perf_counter()
            images = sample(transformer, table, mask, rows, size, args.sample_steps, args.guidance, 10_000, ae, p)
            seconds = (time.perf_counter() - start) / len(images)
            r = judge.evaluate(images, captions)
            c = r["per_category"]
            print(f"| {step} | {size} | {r['overall']:.3f} | {c['single_object']:.2f} | {c['two_objects']:.2f} | "
                  f"{c['counting']:.2f} | {c['colours']:.2f} | {c['position']:.2f} | {seconds:.2f} |", flush=True)
            print(json.dumps({"step": step, "size": size, **r}), file=open(args.workdir / "curve.jsonl", "a"))


if __name__ == "__main__":
    main()
