"""The demo's models and their resumable training loop (PyTorch): VAE, text encoder, teacher.

Sizes live in one :class:`Preset` ("full" for the shipped model, "tiny" for tests).

- VAE: diffusers ``AutoencoderKL``, f4 (three encoder blocks, two downsamplings: 64 px ->
  16x16x4 latents; diffusers downsamples between blocks, so two blocks would be f2), no
  mid-block attention. Loss: L1 + L2 + an L1 term on image gradients (sharp shape edges)
  + a small KL. ``scaling_factor`` = 1 / std of the posterior means, stored in its config.
- Text encoder: a tiny ``T5EncoderModel`` (d_model 128, 2 layers) trained jointly with the
  teacher, over a WordLevel ``tokenizers`` tokenizer of the dataset's closed vocabulary
  (25 words + <pad>, </s>, <unk>), saved as tokenizer.json via ``PreTrainedTokenizerFast``.
  Why trained, not pretrained: the build machines cannot download any pretrained encoder
  (no packaged one is small and offline), and the captions use a closed 25-word grammar, so
  a 2-layer encoder learns everything the prompts can say; the runtime reads tokenizer.json
  with the ``tokenizers`` library, no sentencepiece model needed.
- Teacher: diffusers ``PixArtTransformer2DModel`` (PixArt-Sigma layout: cross-attention to
  the T5 features, adaLN-single, learned sigma), patch 2 on 16x16x4 latents = 64 tokens of
  2*2*4 = 16 values each (<= the width, as issue 7 requires). Loss: epsilon MSE with
  Min-SNR-5 weights (low-noise steps, which only sharpen detail, count less) + the
  learned-variance VLB term of :mod:`litedge.distill.losses` on DDPM's linear schedule
  (PixArt's, and what lit-distill trains the student on); 10% of captions are dropped
  (the empty prompt, "" as the runtime's negative prompt) for classifier-free guidance.

:func:`train_resumable` runs AdamW + linear warm-up + cosine decay (to ``final_lr`` of the
peak) + grad clipping + EMA (+ bf16 autocast on CUDA; on CPU fp32 was faster than bf16
autocast for these small matrices, even with AMX) and writes atomic checkpoints; the batch
and noise of step ``s`` depend only on (seed, s), so a resumed run replays the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from litedge.demo.shapes import COLOURS, NUMBERS, RELATIONS, SHAPES
from litedge.distill import losses as L
from litedge.distill.checkpoint import checkpoint_name
from litedge.distill.data import step_indices
from litedge.distill.trainer import model_kwargs
from litedge.atomic import replace_dir
from litedge.errors import LitedgeError
from litedge.models.configs import _pixart_sigma

SPECIALS = ("<pad>", "</s>", "<unk>")
# PixArt-Sigma's scheduler_config.json: DPM-Solver++ 2M on DDPM's linear beta schedule.
PIXART_SIGMA_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    "lower_order_final": True, "timestep_spacing": "linspace", "steps_offset": 0, "variance_type": None,
}


@dataclass(frozen=True)
class Preset:
    """Every size and step count of one demo build. Steps are optimizer steps; lr is AdamW's peak."""

    name: str
    samples: int  # training images
    eval_prompts: int  # held-out prompts (balanced over the 5 categories)
    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)  # len 3 -> f4; (32, 64, 64) is 2.4x slower on CPU
    vae_norm_groups: int = 8
    vae_steps: int = 2_000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    vae_edge_weight: float = 0.5
    width: int = 128
    heads: int = 4
    layers: int = 6
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 16  # longest caption: 10 words + </s>
    teacher_steps: int = 30_000
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    teacher_min_snr: float | None = 5.0  # Min-SNR-gamma weighting of the epsilon loss; None: unweighted
    caption_dropout: float = 0.1
    student_steps: int = 14_000
    student_batch: int = 32
    student_lr: float = 2e-4
    student_heads: int = 2
    warmup: int = 300
    final_lr: float = 0.1  # cosine decay after warm-up to this fraction of the peak lr at the last step
    ema: float = 0.9999
    save_every: int = 500
    eval_steps: int = 20
    guidance: float = 3.0  # chosen on tuning prompts (bench/demo_guidance.py), not on the eval prompts
    grid_prompts: int = 10
    latency_sizes: tuple[int, ...] = (256, 512)
    latency_repeat: int = 3

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


PRESETS = {
    "full": Preset("full", samples=25_000, eval_prompts=250),
    "tiny": Preset("tiny", samples=64, eval_prompts=10, vae_channels=(8, 16, 16), vae_norm_groups=4, vae_steps=3,
                   vae_batch=4, width=32, heads=2, layers=2, text_width=32, text_layers=1, text_heads=2,
                   teacher_steps=3, teacher_batch=4, student_steps=3, student_batch=4, warmup=1, save_every=2,
                   eval_steps=2, grid_prompts=5, latency_sizes=(64,), latency_repeat=1),
}


# ----------------------------------------------------------------------------- models


def vocabulary() -> list[str]:
    """Every word a shapes caption can hold (the grammar of litedge.demo.shapes), specials first."""
    words = ["a", "an", "and", *NUMBERS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)]
    words += [w for r in RELATIONS for w in r.split()]
    return list(SPECIALS) + sorted(set(words))


def build_tokenizer(max_length: int):
    """WordLevel tokenizer over :func:`vocabulary`: lower-cases, splits on whitespace, appends ``</s>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tokenize(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ids, mask: (N, max_length) int64 each, as lit-distill's cache and the runtime pad them."""
    out = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask.to(torch.int64)


def make_vae(p: Preset, seed: int = 0):
    from diffusers import AutoencoderKL

    n = len(p.vae_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=p.vae_channels,
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             layers_per_block=1, norm_num_groups=p.vae_norm_groups, sample_size=p.image_size,
                             mid_block_add_attention=False)


def make_text_encoder(p: Preset, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    # rounded up to 128 rows: lit-profile's synthetic prompts draw ids below 100 (litedge.profile.inputs)
    vocab = -(-len(vocabulary()) // 128) * 128
    config = T5Config(vocab_size=vocab, d_model=p.text_width, d_kv=p.text_width // p.text_heads, d_ff=2 * p.text_width,
                      num_layers=p.text_layers, num_heads=p.text_heads, feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=8, relative_attention_max_distance=p.text_max_length,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5EncoderModel(config)


def make_teacher(p: Preset, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    if 2 * 2 * 4 > p.width:
        raise LitedgeError(f"width {p.width} is below a token's 16 inputs (2x2 patch x 4 channels): widen the model")
    config = _pixart_sigma(p.layers, p.heads, p.width // p.heads, p.text_width, p.latent_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PixArtTransformer2DModel.from_config(config)


# ----------------------------------------------------------------------------- losses


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance of horizontal and vertical finite differences of (B, 3, H, W) images."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def vae_loss(model: nn.ModuleDict, pixels: torch.Tensor, g: torch.Generator, p: Preset) -> dict[str, torch.Tensor]:
    """pixels (B, 3, H, W) in [-1, 1] -> named terms and ``total``."""
    vae = model["vae"]
    posterior = vae.encode(pixels).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(pixels.device)
    recon = vae.decode(z).sample.float()
    terms = {"l1": (recon - pixels).abs().mean(), "l2": F.mse_loss(recon, pixels),
             "edge": _grad_l1(recon, pixels), "kl": posterior.kl().mean() / z[0].numel()}
    terms["total"] = terms["l1"] + terms["l2"] + p.vae_edge_weight * terms["edge"] + p.vae_kl_weight * terms["kl"]
    return terms


_SCHEDULE = L.DDPMSchedule.linear()  # PixArt's training schedule, as lit-distill's


def teacher_loss(model: nn.ModuleDict, batch: dict[str, torch.Tensor], empty: tuple[torch.Tensor, torch.Tensor],
                 g: torch.Generator, p: Preset) -> dict[str, torch.Tensor]:
    """Epsilon MSE + VLB on latents (B, 4, h, w); captions (ids, mask (B, L)) dropped to ``empty`` at random."""
    x0, ids, mask = batch["latents"], batch["ids"], batch["mask"]
    b, device = x0.shape[0], x0.device
    drop = (torch.rand(b, generator=g) < p.caption_dropout).to(device)[:, None]  # (B, 1)
    ids = torch.where(drop, empty[0].to(device), ids)
    mask = torch.where(drop, empty[1].to(device), mask)
    schedule = _SCHEDULE
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    x_t = L.q_sample(schedule, x0, t, noise)
    text = model["text_encoder"](input_ids=ids, attention_mask=mask)[0]  # (B, L, D)
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    transformer = model["transformer"]
    out = transformer(**model_kwargs(transformer, "pixart", cond, x_t, t, p.image_size))[0]
    eps, var = L.split_learned_sigma(out.float(), x0.shape[1])
    weights = L.min_snr_weights(schedule, t, p.teacher_min_snr) if p.teacher_min_snr else None
    terms = {"mse": L.epsilon_mse(eps, noise, weights), "vlb": L.vlb_loss(schedule, var, eps, x0, x_t, t)}
    terms["total"] = terms["mse"] + terms["vlb"]
    return terms


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, optimizer, state: dict) -> Path:
    """``run_dir/checkpoints/step-NNNNNN/`` (model, ema, optimizer, state.json), then ``latest``; atomic."""
    from safetensors.torch import save_model

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        for name, module in (("model", model), ("ema", ema)):  # save_model: T5's tied embeddings
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        replace_dir(tmp, final)  # a re-save of the same step (a resumed run that went back) replaces it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".latest.tmp-{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (``latest``, else the newest ``step-*`` with state.json)."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip() / "state.json").is_file():
        return root / pointer.read_text().strip()
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer) -> int:
    """Weights and optimizer state into the given objects; returns the step."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    load_model(ema, str(path / "ema.safetensors"), device=str(next(ema.parameters()).device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup: int
    ema: float
    save_every: int
    resume: bool
    device: str
    desc: str
    seed: int = 0
    progress: bool = True
    final_lr: float = 1.0  # fraction of ``lr`` reached at the last step (cosine after warm-up); 1: constant

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then cosine from ``lr`` to ``final_lr * lr``.

        The schedule spans ``steps``: a run resumed to more steps than it was started with
        follows the longer schedule from where it is (its lr goes back up, a warm restart).
        """
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup - 1, 1)
        return self.lr * (self.final_lr + (1.0 - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def sample_batch(arrays: dict[str, np.ndarray], batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of step ``step`` (lit-distill's epoch-permutation sampler) from arrays that share their first axis."""
    count = len(next(iter(arrays.values())))
    idx = sorted(step_indices(count, batch, step, seed=seed))
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in arrays.items()}


def train_resumable(run_dir: Path, model: nn.ModuleDict, loss_fn: Callable[[nn.ModuleDict, int], dict],
                    cfg: LoopConfig) -> tuple[nn.ModuleDict, dict]:
    """Train ``model`` for ``cfg.steps`` steps of ``loss_fn(model, step)``; returns (EMA model, figures).

    Checkpoints every ``save_every`` steps and at the end. An existing checkpoint needs
    ``resume`` (continue from it), else LitedgeError. Losses go to ``run_dir/losses.jsonl``.
    """
    from tqdm import tqdm

    device = torch.device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    latest, start, earlier_seconds = latest_checkpoint(run_dir), 0, 0.0
    if latest is not None and not cfg.resume:
        raise LitedgeError(f"{run_dir} has checkpoint {latest.name}: pass --resume to continue it or --force to restart")
    if latest is not None:
        start = load_checkpoint(latest, model, ema, optimizer)
        earlier_seconds = float(json.loads((latest / "state.json").read_text()).get("train_seconds", 0.0))
    log_path = run_dir / "losses.jsonl"
    rows = [r for r in _read_rows(log_path) if r["step"] <= start]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.desc, disable=not cfg.progress)
    t0, last = time.perf_counter(), {}
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        with autocast:
            terms = loss_fn(model, step)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _update_ema(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        last = {k: float(v.detach()) for k, v in terms.items()}
        rows.append({"step": step + 1, **last})
        bar.set_postfix(loss=f"{last['total']:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _write_rows(log_path, rows)
            save_checkpoint(run_dir, step + 1, model, ema, optimizer,
                            {"desc": cfg.desc, "train_seconds": earlier_seconds + time.perf_counter() - t0})
    seconds = time.perf_counter() - t0
    new = max(cfg.steps - start, 0)
    # train_seconds: this run and the runs it resumed (checkpoints written before it was recorded count 0)
    return ema, {"steps": max(cfg.steps, start), "start_step": start, "new_steps": new, "seconds": round(seconds, 2),
                 "train_seconds": round(earlier_seconds + seconds, 2),
                 "steps_per_s": round(new / seconds, 3) if new else None, "final_losses": last}


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


@torch.no_grad()
def encode_latents(vae, pixels: np.ndarray, batch: int, device: str, progress: bool = True) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> unscaled posterior means (N, 4, h, w) float32."""
    from tqdm import tqdm

    vae = vae.to(device).eval()
    out = []
    for i in tqdm(range(0, len(pixels), batch), desc="encoding", disable=not progress):
        x = to_unit(pixels[i:i + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu().numpy())
    return np.concatenate(out)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # a copy: memmaps are read-only
    return x / 127.5 - 1.0
