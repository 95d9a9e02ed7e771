"""The demo's models and their resumable training loop (PyTorch): autoencoder, text encoder, teacher.

Sizes live in one :class:`Preset` ("full" for the shipped model, "tiny" for tests).

- Autoencoder: diffusers ``AutoencoderDC``, f32, 32 latent channels (litedge.demo.autoencoder):
  256 px -> 8x8 latents, 1024 px -> 32x32, 2048 px -> 64x64.
- Text encoder: a tiny ``T5EncoderModel`` (d_model 128, 2 layers) over a WordLevel ``tokenizers``
  tokenizer of the dataset's closed vocabulary (25 words + <pad>, </s>, <unk>), saved as
  tokenizer.json via ``PreTrainedTokenizerFast``; first trained alone on the caption grammar
  (litedge.demo.caption_pretraining), then frozen. Why trained, not pretrained: the build
  machines cannot download any pretrained encoder, and the captions use a closed grammar.
- Teacher: diffusers ``PixArtTransformer2DModel`` (PixArt-Sigma layout: cross-attention to
  the T5 features, adaLN-single, learned sigma), patch 1 on the 32-channel latents, trained
  progressively at 256, 512 and 1024 px (:func:`phase_of`) with position embeddings laid on
  the 256 px grid at every size and a resolution-dependent timestep shift
  (:func:`shifted_timesteps`). Loss: epsilon MSE with Min-SNR-5 weights + the learned-variance
  VLB term of :mod:`litedge.distill.losses` on DDPM's linear schedule (PixArt's, and what
  lit-distill trains the student on); 10% of captions are dropped (the empty prompt, "" as
  the runtime's negative prompt) for classifier-free guidance.

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
    """Every size and step count of one demo build. Steps are optimizer steps; lr is AdamW's peak.

    Image sizes are pixels. ``base_size`` is the grid the transformer's position embeddings
    are laid on (its ``sample_size`` x 32): at any other size they are interpolated onto the
    same span (PixArt's ``interpolation_scale``), so objects keep their place and relative size.
    """

    name: str
    samples: int  # training scenes of the base stage (PNG + caption at data_size: what lit-distill reads)
    eval_prompts: int  # held-out prompts (balanced over the 5 categories)
    image_size: int = 1024  # native: what lit-generate makes with no size
    base_size: int = 256  # the teacher's first (and longest) training stage, and the student's
    ae_latent_channels: int = 32
    ae_encoder_channels: tuple[int, ...] = (8, 16, 32, 64, 128, 128)  # six levels: f32
    ae_decoder_channels: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
    ae_decoder_layers: tuple[int, ...] = (1, 1, 1, 1, 2, 2)
    ae_crop: int = 128
    vae_steps: int = 1_800
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_edge_weight: float = 0.5
    width: int = 128
    heads: int = 4
    layers: int = 6
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 16  # longest caption: 10 words + </s>
    text_steps: int = 2_000
    text_batch: int = 128
    text_lr: float = 1e-3
    # (size px, share of the teacher's steps, batch, scenes): PixArt-Sigma / SANA-style progressive resolution
    teacher_phases: tuple[tuple[int, float, int, int], ...] = ((256, 0.8, 32, 8_000), (512, 0.13, 12, 2_000),
                                                               (1024, 0.07, 4, 600))
    teacher_steps: int = 5_000
    teacher_batch: int = 32  # of the base phase (the others: teacher_phases)
    teacher_lr: float = 1e-3
    teacher_min_snr: float | None = 5.0  # Min-SNR-gamma weighting of the epsilon loss; None: unweighted
    caption_dropout: float = 0.1
    student_steps: int = 3_000
    student_batch: int = 32  # of the base phase (the others: student_phases)
    # (size px, share of the student's steps, batch, scenes): lit-distill at the base size, then resumed at 1024
    student_phases: tuple[tuple[int, float, int, int], ...] = ((256, 0.9, 32, 8_000), (1024, 0.1, 4, 600))
    student_lr: float = 2e-4
    student_heads: int = 2
    warmup: int = 300
    final_lr: float = 0.1  # cosine decay after warm-up to this fraction of the peak lr at the last step
    ema: float = 0.999
    save_every: int = 250
    eval_steps: int = 20
    guidance: float = 3.0
    grid_prompts: int = 10
    eval_sizes: tuple[int, ...] = (1024, 256, 2048)  # ShapesEval sizes, the native one first
    latency_sizes: tuple[int, ...] = (512, 1024, 2048)
    latency_repeat: int = 3

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.ae_encoder_channels) - 1)

    @property
    def data_size(self) -> int:
        return self.base_size

    @property
    def trained_sizes(self) -> list[int]:
        return sorted({size for size, *_ in self.teacher_phases})


PRESETS = {
    "full": Preset("full", samples=8_000, eval_prompts=250),
    "tiny": Preset("tiny", samples=64, eval_prompts=10, image_size=128, base_size=64, ae_latent_channels=8,
                   ae_encoder_channels=(4, 4, 8, 8, 8, 8), ae_decoder_channels=(4, 4, 8, 8, 8, 8),
                   ae_decoder_layers=(1,) * 6, ae_crop=64, vae_steps=3, vae_batch=2, width=32, heads=2, layers=2,
                   text_width=32, text_layers=1, text_heads=2, text_steps=3, text_batch=8,
                   teacher_phases=((64, 0.6, 4, 64), (128, 0.4, 2, 8)), teacher_steps=5, teacher_batch=4,
                   student_steps=3, student_batch=4, student_phases=((64, 0.67, 4, 64), (128, 0.33, 2, 8)),
                   warmup=1, save_every=2, eval_steps=2, grid_prompts=5,
                   eval_sizes=(128, 64), latency_sizes=(64,), latency_repeat=1),
}


def phase_ends(phases: tuple[tuple[int, float, int, int], ...], steps: int) -> list[int]:
    """The step each phase ends at (exclusive) when ``steps`` are split by the phases' shares; the last is ``steps``."""
    total, end, ends = sum(share for _, share, _, _ in phases), 0.0, []
    for _, share, _, _ in phases:
        end += share / total * steps
        ends.append(round(end))
    return ends[:-1] + [steps]


def phase_of(p: Preset, steps: int, step: int) -> tuple[int, int, int]:
    """(size, batch, scenes) of 0-based teacher ``step`` in a run of ``steps``: phases split it by their shares."""
    for (size, _, batch, scenes), end in zip(p.teacher_phases, phase_ends(p.teacher_phases, steps)):
        if step < end:
            return size, batch, scenes
    size, _, batch, scenes = p.teacher_phases[-1]
    return size, batch, scenes


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
    """The preset's ``AutoencoderDC`` (litedge.demo.autoencoder)."""
    from litedge.demo.autoencoder import make_autoencoder

    return make_autoencoder(p.ae_latent_channels, p.ae_encoder_channels, p.ae_decoder_channels, p.ae_decoder_layers,
                            seed)


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
    """PixArt-Sigma-style transformer on the autoencoder's latents, patch 1 (one token per 32x32 px)."""
    from diffusers import PixArtTransformer2DModel

    if p.ae_latent_channels > p.width:
        raise LitedgeError(f"width {p.width} is below a token's {p.ae_latent_channels} latent channels: widen the model")
    # sample_size = the native 1024 px grid (what lit-generate makes by default), and its position
    # embeddings laid on the 256 px base grid: interpolation_scale = 1024 / 256, as PixArt-Sigma's
    # 1024 px model keeps its 512 px grid (identical embeddings to sample_size 8, scale 1, at every size).
    config = _pixart_sigma(p.layers, p.heads, p.width // p.heads, p.text_width, p.image_size // p.vae_factor)
    config.update(in_channels=p.ae_latent_channels, out_channels=2 * p.ae_latent_channels, patch_size=1,
                  interpolation_scale=p.image_size // p.base_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PixArtTransformer2DModel.from_config(config)


# ----------------------------------------------------------------------------- losses


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def step_rng(seed: int, step: int) -> np.random.Generator:
    """numpy's random stream of one training step (scenes, crops): a function of (seed, step) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, 1]))


_SCHEDULE = L.DDPMSchedule.linear()  # PixArt's training schedule, as lit-distill's


def shifted_timesteps(t: torch.Tensor, shift: float, schedule: L.DDPMSchedule = _SCHEDULE) -> torch.Tensor:
    """Move timesteps (B,) int64 to the last discrete step whose signal-to-noise ratio is >= SNR(t) / shift**2.

    The resolution-dependent shift of SD3 / SANA, on a discrete DDPM schedule: a larger image
    of the same scene has more tokens per object, so the same noise destroys less of its
    layout; with shift = sqrt(tokens / base tokens) training spends its steps where the layout
    is still being decided. The model is told the step it actually sees (no schedule change).
    """
    if shift == 1.0:
        return t
    acp = schedule.alphas_cumprod.to(torch.float64)
    a = acp[t]
    target = a / (a + shift**2 * (1 - a))  # SNR' = SNR / shift^2
    # alphas_cumprod decreases with t: search its reverse
    idx = torch.searchsorted(acp.flip(0), target)
    return (len(acp) - 1 - idx.clamp(max=len(acp) - 1)).to(t.dtype)


def resolution_shift(p: Preset, size: int) -> float:
    """sqrt(tokens / base tokens) = the side ratio, capped at 3 (SANA's shift at 1024 px): beyond it the
    linear schedule's last step takes a large share of the samples."""
    return min(size / p.base_size, 3.0)


def teacher_loss(transformer: nn.Module, batch: dict[str, torch.Tensor], empty: torch.Tensor, g: torch.Generator,
                 p: Preset, size: int) -> dict[str, torch.Tensor]:
    """Epsilon MSE + VLB on latents (B, C, h, w) of ``size`` px images, text features (B, L, D) + mask (B, L).

    Captions are dropped to ``empty`` (the "" prompt's features, (1, L, D)) at random; timesteps
    are shifted by :func:`resolution_shift` (:func:`shifted_timesteps`).
    """
    x0, text, mask = batch["latents"].float(), batch["text"].float(), batch["mask"]
    b, device = x0.shape[0], x0.device
    drop = (torch.rand(b, generator=g) < p.caption_dropout).to(device)
    text = torch.where(drop[:, None, None], empty[0].to(device), text)
    mask = torch.where(drop[:, None], batch["empty_mask"], mask)
    schedule = _SCHEDULE
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=g)
    t = shifted_timesteps(t, resolution_shift(p, size)).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    x_t = L.q_sample(schedule, x0, t, noise)
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    out = transformer(**model_kwargs(transformer, "pixart", cond, x_t, t, size))[0]
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


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # a copy: memmaps are read-only
    return x / 127.5 - 1.0
