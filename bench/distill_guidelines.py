"""LiT's training guidelines, measured side by side on one budget: init and loss of a student.

A tiny PixArt-Sigma teacher is first trained briefly on generated shapes (so its predictions
mean something), then four LiT students are distilled from it with the same data, seed and
step budget:

    init     inherit (weight inheritance, LiT guideline 3/4) | scratch (every weight random)
    loss     task (eps MSE + VLB) | task + hybrid distillation (lambda_noise, lambda_var)

Each student (raw weights, not EMA) is scored on fixed held-out noise draws of the cached
data: MSE(student eps, teacher eps) ("vs teacher", lower is closer to the teacher) and
MSE(student eps, true noise) ("task").

    python bench/distill_guidelines.py                      # ~1-2 min on 2 CPU cores
    python bench/distill_guidelines.py --steps 400 --teacher-steps 800
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.distill.fixtures: the tiny pipeline and shapes builders

from litedge.distill import DistillConfig, FeatureCache, cache_features, distill  # noqa: E402
from litedge.distill import losses as L  # noqa: E402
from litedge.distill.data import step_indices  # noqa: E402
from litedge.distill.trainer import load_pipeline_components, model_kwargs  # noqa: E402
from litedge.models.loading import load_model  # noqa: E402
from litedge.models.student import save_transformer  # noqa: E402
from tests.distill.fixtures import make_shapes_dataset, make_tiny_pixart_pipeline  # noqa: E402

RES, TEXT_LEN = 64, 16


def train_teacher(pipeline: Path, cache: FeatureCache, steps: int, batch: int, lr: float) -> None:
    """Plain diffusion training of the softmax teacher (eps MSE + VLB), written back to transformer/."""
    model = load_model(pipeline).transformer.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule, g = L.DDPMSchedule.linear(), torch.Generator().manual_seed(0)
    for step in range(steps):
        b = cache.batch(step_indices(len(cache), batch, step, seed=0))
        x0 = b["latents"]
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
        x_t = L.q_sample(schedule, x0, t, noise)
        eps, var = L.split_learned_sigma(model(**model_kwargs(model, "pixart", b, x_t, t, RES))[0], 4)
        loss = L.epsilon_mse(eps, noise) + L.vlb_loss(schedule, var, eps, x0, x_t, t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    save_transformer(model.eval(), pipeline / "transformer", force=True)


@torch.no_grad()
def score(student, teacher, cache: FeatureCache, draws: int = 4) -> tuple[float, float]:
    """(MSE vs teacher eps, MSE vs true noise) over every cached sample, ``draws`` fixed noise draws each."""
    schedule, g = L.DDPMSchedule.linear(), torch.Generator().manual_seed(1234)
    b = cache.batch(list(range(len(cache))))
    x0, vs_teacher, task = b["latents"], 0.0, 0.0
    for _ in range(draws):
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
        x_t = L.q_sample(schedule, x0, t, noise)
        s_eps = student(**model_kwargs(student, "pixart", b, x_t, t, RES))[0][:, :4]
        t_eps = teacher(**model_kwargs(teacher, "pixart", b, x_t, t, RES))[0][:, :4]
        vs_teacher += float(L.noise_distill_mse(s_eps, t_eps)) / draws
        task += float(L.epsilon_mse(s_eps, noise)) / draws
    return vs_teacher, task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="student steps per run")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lit-distill-bench-"))
    try:
        pipeline = make_tiny_pixart_pipeline(root / "teacher")
        data = make_shapes_dataset(root / "data", count=args.images, size=RES)
        vae, encoder, tokenizer = load_pipeline_components(pipeline, text=True)
        cache = FeatureCache(cache_features(data, vae, encoder, tokenizer, root / "cache", RES,
                                            text_max_length=TEXT_LEN).path)
        start = time.perf_counter()
        train_teacher(pipeline, cache, args.teacher_steps, args.batch, args.lr)
        teacher = load_model(pipeline).transformer
        print(f"teacher: {args.teacher_steps} steps in {time.perf_counter() - start:.1f}s; "
              f"task eps MSE {score(teacher, teacher, cache)[1]:.4f}")
        print(f"students: {args.steps} steps, batch {args.batch}, lr {args.lr}, {len(cache)} images, seed 0\n")
        print("| init | loss | vs teacher (eps MSE) | task (eps MSE) | s |")
        print("| --- | --- | --- | --- | --- |")
        for init in ("inherit", "scratch"):
            for name, noise, var in (("task", 0.0, 0.0), ("task + distill (0.5, 0.05)", 0.5, 0.05)):
                start = time.perf_counter()
                result = distill(DistillConfig(
                    teacher=str(pipeline), family="lit", data=str(root / "cache"), out=str(root / f"{init}-{noise}"),
                    resolution=RES, steps=args.steps, batch=args.batch, lr=args.lr, lambda_noise=noise,
                    lambda_var=var, init=init, save_every=args.steps, ema=0.0, progress=False))
                vs_teacher, task = score(result.student.eval(), teacher, cache)
                print(f"| {init} | {name} | {vs_teacher:.4f} | {task:.4f} | {time.perf_counter() - start:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
