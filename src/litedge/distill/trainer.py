"""distill(): train a linear-attention student against its softmax teacher.

One run: load the teacher, encode the data once (:mod:`litedge.distill.data`), make the
student by weight inheritance (``linearize``) or from scratch, then AdamW steps on
task + distillation losses (:mod:`litedge.distill.losses`) with grad clipping, EMA,
optional autocast, gradient checkpointing and a warm-up phase that trains only the new
attention weights. Checkpoints every ``save_every`` steps (:mod:`litedge.distill.checkpoint`);
the finished student is written as a pipeline directory ``RUN_DIR/student/``.

Several processes: run under ``torchrun``; the student is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU, env:// init), each rank reads its
DistributedSampler shard of the cache, rank 0 writes. FSDP is not implemented: DDP keeps
a full student and teacher on every device, which fits PixArt-Sigma (0.6 B) and SD3.5-M
(2.5 B) on 80 GB GPUs; larger teachers would need FSDP.

Reproducibility: the batch, noise and timesteps of step ``s`` are functions of
(seed, s, rank) only, so a resumed run replays the uninterrupted one exactly (on CPU with
``deterministic=True``, bit for bit).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from litedge.distill import losses as L
from litedge.distill.checkpoint import find_latest, load_checkpoint, save_checkpoint
from litedge.distill.guards import (check_config, check_finite_losses, check_finite_weights, check_resolution,
                                    cleanup_on_refusal)
from litedge.distill.data import FeatureCache, cache_features, discover, is_cache, read_cache_info, step_indices
from litedge.distill.logs import LossLog, log
from litedge.atomic import atomic_directory
from litedge.errors import LitedgeError
from litedge.models.linearize import LinearizeConfig, LinearizeReport, linearize, linearize_, teacher_kind
from litedge.models.student import save_transformer, student_model_index

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistillConfig:
    """Everything a run needs; saved in every checkpoint's state.json.

    Loss: task_weight * task (eps MSE + learned-variance VLB, or flow velocity MSE for SD3)
    + lambda_noise * MSE(student eps, teacher eps) + lambda_var * MSE(student var, teacher var)
    + feature_weight * mean over blocks of MSE(student attention output, teacher's).
    EMA decay ramps up as min(ema, (1 + step) / (10 + step)); ema=0 disables the EMA.
    """

    teacher: str
    family: Literal["lit", "edit", "mmedit"]
    data: str
    out: str
    resolution: int = 256
    steps: int = 1000
    batch: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    task_weight: float = 1.0
    lambda_noise: float = 0.5
    lambda_var: float = 0.05
    feature_weight: float = 0.0
    ema: float = 0.9999
    save_every: int = 500
    seed: int = 0
    resume: bool = False
    freeze_inherited_steps: int = 0
    grad_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    init: Literal["inherit", "scratch"] = "inherit"
    allow_missing_captions: bool = False
    heads: int | None = None
    text_max_length: int = 300
    student_weights: Literal["ema", "raw"] = "ema"  # which weights RUN_DIR/student/ gets
    deterministic: bool = False
    device: str | None = None  # default: cuda if available, else cpu
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 0, f"--steps {self.steps}: expected >= 0"),
            (self.batch >= 1, f"--batch {self.batch}: expected >= 1"),
            (self.save_every >= 1, f"--save-every {self.save_every}: expected >= 1"),
            (self.resolution >= 8, f"--resolution {self.resolution}: expected >= 8 pixels"),
            (0.0 <= self.ema < 1.0, f"--ema {self.ema}: expected a decay in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}"),
            (self.init in ("inherit", "scratch"), f"--init {self.init}: expected inherit or scratch"),
        ]
        for ok, message in checks:
            if not ok:
                raise LitedgeError(message)
        check_config(self)  # litedge.distill.guards: finite lr / weights, text length, --out, --device


@dataclass
class RunResult:
    """What a run produced. ``student`` / ``ema`` are the in-memory modules (rank 0's copy)."""

    run_dir: Path
    step: int
    losses: dict
    student_dir: Path | None
    checkpoint: Path | None
    skipped_images: list[str] = field(default_factory=list)
    student: nn.Module | None = None
    ema: nn.Module | None = None


# --------------------------------------------------------------------------- setup


def load_teacher(source: str):
    """The teacher transformer and its pipeline directory (the one call to swap for a new loader)."""
    from litedge.models.loading import load_model

    loaded = load_model(source)
    if loaded.linear is not None:
        raise LitedgeError(f"--teacher {source} is already a {loaded.linear.family} student: pass the softmax teacher")
    return loaded.transformer, loaded.pipeline_dir


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device: str | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        return _Dist(dist.get_rank(), dist.get_world_size(), dev)
    return _Dist(0, 1, torch.device(device or ("cuda" if cuda else "cpu")))


def load_pipeline_components(pipeline_dir: Path, text: bool):
    """The VAE and (for captions) text encoder + tokenizer of a diffusers pipeline directory."""
    import diffusers
    import transformers

    index = json.loads((pipeline_dir / "model_index.json").read_text())
    if "text_encoder_2" in index or "text_encoder_3" in index:
        raise LitedgeError(
            f"{pipeline_dir}: caching SD3's three text encoders is not supported yet: "
            "build a feature cache (see litedge.distill.data) and pass it as --data"
        )
    vae_class = json.loads((pipeline_dir / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if vae_class not in ("AutoencoderKL", "AutoencoderDC"):
        raise LitedgeError(f"{pipeline_dir / 'vae'}: a {vae_class} cannot encode images here; "
                           "expected a diffusers AutoencoderKL or AutoencoderDC (or pass a feature cache as --data)")
    vae = getattr(diffusers, vae_class).from_pretrained(pipeline_dir / "vae").eval()
    if not text:
        return vae, None, None
    if not (pipeline_dir / "text_encoder").is_dir():
        raise LitedgeError(f"{pipeline_dir} has no text_encoder/: captioned data needs the teacher's text encoder")
    encoder_class = index.get("text_encoder", ["transformers", "T5EncoderModel"])[1]
    encoder = getattr(transformers, encoder_class).from_pretrained(pipeline_dir / "text_encoder").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    return vae, encoder, tokenizer


ENCODER_PARTS = ("vae", "text_encoder", "tokenizer")


def encoders_fingerprint(pipeline_dir: Path) -> str:
    """sha256 over (path, size, mtime) of the files of the pipeline's vae/, text_encoder/, tokenizer/.

    Cheap (no weights are read) and changes when any of them is retrained or replaced, so a
    cached feature set is never reused with encoders other than those that made it.
    """
    digest = hashlib.sha256()
    for part in ENCODER_PARTS:
        folder = pipeline_dir / part
        for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if f.is_file():
                stat = f.stat()
                digest.update(f"{f.relative_to(pipeline_dir).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_fits(path: Path, source: str, text_max_length: int, encoders: str | None) -> bool:
    """A cache in the run directory is reused only for the same data, caption length and encoders."""
    if not is_cache(path):
        return False
    info = read_cache_info(path)
    return info.source == source and info.text_max_length in (None, text_max_length) and info.encoders == encoders


def prepare_cache(cfg: DistillConfig, pipeline_dir: Path | None, d: _Dist) -> FeatureCache:
    """--data as a ready cache, or RUN_DIR/cache/<R>px built once by rank 0 (reused when present)."""
    if is_cache(cfg.data):
        return FeatureCache(cfg.data)
    target = Path(cfg.out) / "cache" / f"{cfg.resolution}px"
    source = str(Path(cfg.data).resolve())
    encoders = encoders_fingerprint(pipeline_dir) if pipeline_dir is not None else None
    if d.main and not _cache_fits(target, source, cfg.text_max_length, encoders):
        samples = discover(cfg.data, allow_missing_captions=cfg.allow_missing_captions)
        if pipeline_dir is None:
            raise LitedgeError(
                f"--teacher {cfg.teacher} is a lone transformer: encoding images needs a pipeline directory with vae/"
                " (and text_encoder/, tokenizer/), or pass a feature cache as --data"
            )
        vae, encoder, tokenizer = load_pipeline_components(pipeline_dir, text=samples[0].label is None)
        info = cache_features(samples, vae, encoder, tokenizer, target, cfg.resolution,
                              text_max_length=cfg.text_max_length, progress=cfg.progress, source=source,
                              encoders=encoders)
        if info.skipped:
            log.warning(f"skipped {len(info.skipped)} image(s) that failed to decode, e.g. {info.skipped[0]}")
    d.barrier()
    return FeatureCache(target)


def make_student(teacher: nn.Module, cfg: DistillConfig) -> tuple[nn.Module, LinearizeReport]:
    """Weight inheritance (``linearize``), or with init="scratch" every weight random."""
    student, report = linearize(teacher, cfg.family, cfg.heads, seed=cfg.seed)
    if cfg.init == "scratch":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 1)
            fresh = type(teacher).from_config(teacher.config)
            linearize_(fresh, LinearizeConfig(family=cfg.family, heads=cfg.heads))
        student.load_state_dict(fresh.state_dict())
        report = LinearizeReport(inherited=[], new=list(student.state_dict()), dropped=report.dropped)
    return student, report


# --------------------------------------------------------------------------- one step


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def model_kwargs(model: nn.Module, kind: str, batch: dict, x_t: torch.Tensor, timesteps: torch.Tensor,
                 pixels: int) -> dict:
    """Forward arguments of a PixArt / DiT / SD3 transformer for a cached batch."""
    kw = {"hidden_states": x_t, "timestep": timesteps, "return_dict": False}
    if kind == "dit":
        kw["class_labels"] = batch["class_labels"]
    elif kind == "pixart":
        kw["encoder_hidden_states"] = batch["encoder_hidden_states"]
        kw["encoder_attention_mask"] = batch["encoder_attention_mask"]
        cond = {"resolution": None, "aspect_ratio": None}
        if getattr(model.config, "use_additional_conditions", False):
            b = x_t.shape[0]
            cond = {"resolution": torch.tensor([[pixels, pixels]], dtype=x_t.dtype).repeat(b, 1).to(x_t.device),
                    "aspect_ratio": torch.ones(b, 1, dtype=x_t.dtype, device=x_t.device)}
        kw["added_cond_kwargs"] = cond
    else:
        kw["encoder_hidden_states"] = batch["encoder_hidden_states"]
        kw["pooled_projections"] = batch["pooled_projections"]
    return kw


# --------------------------------------------------------------------------- the run


class _Trainer:
    def __init__(self, cfg: DistillConfig, d: _Dist):
        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.out)
        self.teacher, self.pipeline_dir = load_teacher(cfg.teacher)
        if not is_cache(cfg.data):
            check_resolution(cfg.resolution, self.teacher, self.pipeline_dir)  # litedge.distill.guards
        self.kind = teacher_kind(self.teacher)
        self.student, self.report = make_student(self.teacher, cfg)  # refuses a wrong family early
        self.latest = self._check_resume()
        self.cache = prepare_cache(cfg, self.pipeline_dir, d)
        self.teacher.to(d.device).eval().requires_grad_(False)
        self.student.to(d.device).train()
        if cfg.grad_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False) if cfg.ema > 0 else None
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.new_params = set(self.report.new)
        self.schedule = L.DDPMSchedule.linear()
        self.flow = self.kind == "sd3"
        self.model = self.student
        if d.world > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16" and d.device.type == "cuda")
        self.start = self._maybe_resume()
        self.log = LossLog(self.run_dir, resume_step=self.start if cfg.resume else None)

    def _check_resume(self) -> Path | None:
        latest = find_latest(self.run_dir)
        if not self.cfg.resume and latest is not None:
            raise LitedgeError(f"{self.run_dir} already has checkpoints: pass --resume to continue it or choose a new --out")
        if self.cfg.resume and latest is None:
            raise LitedgeError(f"--resume: {self.run_dir} has no complete checkpoint to resume from; run without --resume")
        return latest

    def _maybe_resume(self) -> int:
        latest = self.latest
        if latest is None:
            return 0
        state = load_checkpoint(latest, self.student, self.ema, self.optimizer)
        saved_family = state["config"]["family"]
        if saved_family != self.cfg.family:
            raise LitedgeError(f"--resume: {latest} is a {saved_family} run, not --family {self.cfg.family}")
        return int(state["step"])

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = step_indices(len(self.cache), self.cfg.batch, step, seed=self.cfg.seed, rank=self.d.rank, world=self.d.world)
        return {k: v.to(self.d.device) for k, v in self.cache.batch(idx).items()}

    def _sample(self, x0: torch.Tensor, step: int):
        g = _step_generator(self.cfg.seed, step, self.d.rank)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        if self.flow:  # SD3: logit-normal flow times, the model sees t * 1000
            t = torch.sigmoid(torch.randn(x0.shape[0], generator=g)).to(x0.device)
            return noise, t, L.flow_sample(x0, t, noise), t * 1000.0
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        return noise, t, L.q_sample(self.schedule, x0, t, noise), t

    def train_step(self, step: int) -> dict[str, float]:
        cfg, batch = self.cfg, self._batch(step)
        x0 = batch["latents"]
        noise, t, x_t, timesteps = self._sample(x0, step)
        pixels = self.cache.info.resolution
        dtype = PRECISIONS[cfg.precision]
        autocast = torch.autocast(self.d.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        feats = cfg.feature_weight > 0
        t_taps, s_taps = L.AttentionTaps(self.teacher, self.kind), L.AttentionTaps(self.student, self.kind)
        with autocast, (t_taps if feats else contextlib.nullcontext()), (s_taps if feats else contextlib.nullcontext()):
            with torch.no_grad():
                t_out = self.teacher(**model_kwargs(self.teacher, self.kind, batch, x_t, timesteps, pixels))[0]
            s_out = self.model(**model_kwargs(self.student, self.kind, batch, x_t, timesteps, pixels))[0]
            weights = L.LossWeights(cfg.task_weight, cfg.lambda_noise, cfg.lambda_var, cfg.feature_weight)
            terms = L.compute_losses(weights, self.kind, self.schedule, s_out, t_out, x0, x_t, noise, t,
                                     s_taps.clear(), t_taps.clear(), self.student.config.in_channels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms["total"]).backward()
            s_taps.clear()  # gradient checkpointing re-runs the forward hooks
        if step < cfg.freeze_inherited_steps:  # AdamW skips parameters without a gradient
            for name, p in self.student.named_parameters():
                if name not in self.new_params:
                    p.grad = None
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.grad is not None], 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema(step)
        return {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        if self.ema is None:
            return
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.student.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.student.buffers()):
            e.copy_(b)

    def save(self, step: int):
        if self.d.main:
            path = save_checkpoint(self.run_dir, step, self.student, self.ema, self.optimizer,
                                   {"config": dataclasses.asdict(self.cfg)})
            self.log.write()
        else:
            path = None
        self.d.barrier()
        return path

    def run(self) -> RunResult:
        from tqdm import tqdm

        cfg, checkpoint, last = self.cfg, None, {}
        bar = tqdm(range(self.start, cfg.steps), initial=self.start, total=cfg.steps, desc="distill",
                   disable=not (cfg.progress and self.d.main))
        tick = time.perf_counter()
        for step in bar:
            last = self.train_step(step)
            check_finite_losses(last, step + 1)  # litedge.distill.guards: a diverged run publishes nothing
            now = time.perf_counter()
            row = {"step": step + 1, **last, "lr": cfg.lr, "steps_per_s": 1.0 / max(now - tick, 1e-9)}
            tick = now
            self.log.append(row)
            bar.set_postfix(loss=f"{last['total']:.4f}", it_s=f"{row['steps_per_s']:.1f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                checkpoint = self.save(step + 1)
        if self.start >= cfg.steps and self.d.main:
            checkpoint = find_latest(self.run_dir)
        student_dir = self.write_student() if self.d.main else None
        return RunResult(self.run_dir, max(self.start, cfg.steps), last, student_dir, checkpoint,
                         list(self.cache.info.skipped), self.student, self.ema)

    def write_student(self) -> Path:
        """RUN_DIR/student/: the teacher's pipeline with the student's transformer/ (atomic)."""
        out = self.run_dir / "student"
        check_finite_weights(self.ema if self.cfg.student_weights == "ema" and self.ema is not None else self.student,
                             "the student")  # litedge.distill.guards: never a NaN student
        with atomic_directory(out) as tmp:
            if self.pipeline_dir is not None:
                for item in sorted(self.pipeline_dir.iterdir()):
                    if item.is_dir() and item.name != "transformer":
                        shutil.copytree(item, tmp / item.name)
                    elif item.is_file() and item.name == "model_index.json":  # names the student's class
                        index = student_model_index(json.loads(item.read_text()), self.student)
                        (tmp / item.name).write_text(json.dumps(index, indent=2))
            use_ema = self.cfg.student_weights == "ema" and self.ema is not None
            save_transformer(self.ema if use_ema else self.student, tmp / "transformer")
        return out


def distill(config: DistillConfig) -> RunResult:
    """Distill ``config.teacher`` into a ``config.family`` student; see :class:`DistillConfig`.

    Returns the run's final losses, the newest checkpoint, RUN_DIR/student/ and the modules.
    Raises LitedgeError for bad input (a family the teacher cannot take, empty data, a
    missing caption, ``resume`` without a checkpoint, ...).
    """
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    d = _init_distributed(config.device)
    with cleanup_on_refusal(config.out):  # litedge.distill.guards: a refused run leaves no empty run folder
        if d.main:
            Path(config.out).mkdir(parents=True, exist_ok=True)
        return _Trainer(config, d).run()
