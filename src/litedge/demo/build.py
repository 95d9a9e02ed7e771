"""Build the demo model from scratch, one resumable command per stage.

    python -m litedge.demo.build all --workdir runs/demo --device cuda --resume
    python -m litedge.demo.build teacher --workdir runs/demo --steps 20000 --resume

Stages (``all`` runs them in order and skips the ones already done):

    data     the shapes dataset at the base size (PNG + .txt captions) and held-out eval prompts
    vae      AutoencoderDC f32 trained on crops of scenes at 256-2048 px; scaling_factor = 1 / latent std
                                                                                -> DIR/vae/
    text     tiny T5 trained on the caption grammar (litedge.demo.caption_pretraining)  -> DIR/text/
    teacher  PixArt-Sigma-style transformer on the frozen T5, progressively at 256, 512, 1024 px
                                                                                -> DIR/teacher/
    student  lit-distill (family lit, 2 heads) from the teacher                   -> DIR/student/
    export   teacher and student, fp32 and int4 CPU bundles                       -> DIR/bundles/
    eval     ShapesEval on held-out prompts through the torch-free runtime at the preset's
             eval sizes (1024, 256, 2048 px), latency at 512-2048 px, a sample grid
                                                               -> DIR/eval.json, DIR/samples.png
    ship     the student int4 bundle (+ its pipeline weights, + the teacher's transformer, while
             all fit in 25 MB)                                                  -> litedge/demo/model/

Each stage writes ``DIR/<stage>/done.json`` (its figures and time) last; a training stage
keeps checkpoints in ``DIR/runs/<stage>/`` and continues from them with ``--resume``
(also to more ``--steps`` than a finished run had). ``--force`` redoes a stage. Running
a stage marks every later stage not done, so ``all`` redoes what depends on it. Sizes
and step counts come from a :class:`litedge.demo.training.Preset` (``--tiny`` for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from litedge.cli import run_command
from litedge.demo import MODEL_DIR
from litedge.demo.shapes import CATEGORIES, eval_prompts, write_dataset
from litedge.errors import LitedgeError

STAGES = ("data", "vae", "text", "teacher", "student", "export", "eval", "ship")
TRAINING = {"vae": "vae_steps", "text": "text_steps", "teacher": "teacher_steps", "student": "student_steps"}
BUNDLES = tuple(f"{m}-{w}" for m in ("teacher", "student") for w in ("fp32", "int4"))
SHIP_LIMIT_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class BuildConfig:
    """The command line, typed once. ``steps`` / ``batch`` override the preset's for training stages."""

    workdir: Path
    preset: str = "full"
    device: str = "cpu"
    steps: int | None = None
    batch: int | None = None
    samples: int | None = None
    eval_prompts: int | None = None  # the first N held-out prompts (default: all of the preset's)
    eval_sizes: tuple[int, ...] | None = None  # compute only these sizes' eval parts (default: the preset's)
    eval_bundles: tuple[str, ...] | None = None  # ... and only these bundles' (default: all four)
    latency: bool = True  # measure latency of the selected bundles
    grid: bool = True  # draw the sample grid
    init_teacher: Path | None = None  # a transformer folder a new teacher run starts from (warm restart)
    resume: bool = False
    force: bool = False
    ship_to: Path = MODEL_DIR
    seed: int = 0
    threads: int | None = None  # torch CPU threads (1 can be much faster on a shared, loaded machine)
    progress: bool = True

    @property
    def p(self):
        from litedge.demo.training import PRESETS

        base = PRESETS[self.preset]
        return dataclasses.replace(base, samples=self.samples or base.samples)

    def steps_of(self, stage: str) -> int:
        return self.steps if self.steps is not None else getattr(self.p, TRAINING[stage])

    def batch_of(self, stage: str) -> int:
        return self.batch if self.batch is not None else getattr(self.p, f"{stage}_batch")


@dataclass(frozen=True)
class Paths:
    """Every path a build reads or writes (one place, style #8)."""

    root: Path

    def stage(self, name: str) -> Path:  # the stage's artifact (+ done.json)
        return self.root / {"export": "bundles"}.get(name, name)

    def run(self, name: str) -> Path:  # checkpoints and caches
        return self.root / "runs" / name

    def done(self, name: str) -> Path:
        return self.stage(name) / "done.json"

    def bundle(self, name: str) -> Path:
        return self.root / "bundles" / f"{name}.litedge"

    @property
    def pixels(self) -> Path:
        return self.stage("data") / "pixels.npy"

    @property
    def prompts(self) -> Path:
        return self.stage("data") / "eval_prompts.jsonl"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def grid(self) -> Path:
        return self.root / "samples.png"


# ----------------------------------------------------------------------------- helpers


def _atomic_dir(final: Path, fill) -> Path:
    """Build a directory with ``fill(tmp)`` next to ``final``, then swap it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "done.json")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _column(path: Path, name: str) -> list[float]:
    """One numeric column of a CSV log (lit-distill's losses.csv); [] when absent."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def _require(paths: Paths, *stages: str) -> None:
    for stage in stages:
        if not paths.done(stage).is_file():
            raise LitedgeError(f"stage {stage!r} is not done in {paths.root}: run "
                               f"`python -m litedge.demo.build {stage} --workdir {paths.root}` first")


# ----------------------------------------------------------------------------- stages


def stage_data(cfg: BuildConfig, paths: Paths) -> dict:
    """Training images + captions (write_dataset) at the base size, and the held-out eval prompts."""
    p, out = cfg.p, paths.stage("data")
    write_dataset(out, p.samples, cfg.seed, p.data_size)
    rows = _rows(out / "metadata.jsonl")
    scenes = eval_prompts(p.eval_prompts, cfg.seed)
    paths.prompts.write_text("".join(json.dumps({"caption": s.caption, "category": s.category}) + "\n" for s in scenes))
    return {"samples": len(rows), "eval_prompts": len(scenes), "image_size": p.data_size,
            "eval_per_category": {c: sum(s.category == c for s in scenes) for c in CATEGORIES}}


def stage_vae(cfg: BuildConfig, paths: Paths) -> dict:
    import torch
    from torch import nn

    from litedge.demo import autoencoder as A
    from litedge.demo import training as T
    from litedge.demo.shapes import render, tuning_prompts
    from litedge.demo.shapes_eval import ShapesEval

    _require(paths, "data")
    p, batch = cfg.p, cfg.batch_of("vae")

    def loss(model, step):
        crops = A.crop_batch(T.step_rng(cfg.seed, step), batch, p.ae_crop)
        return A.autoencoder_loss(model["vae"], T.to_unit(crops).to(cfg.device), p.vae_edge_weight)

    loop = T.LoopConfig(cfg.steps_of("vae"), p.vae_lr, p.warmup, p.ema, p.save_every, cfg.resume, cfg.device, "vae",
                        cfg.seed, cfg.progress, p.final_lr)
    ema, figures = T.train_resumable(paths.run("vae"), nn.ModuleDict({"vae": T.make_vae(p, cfg.seed)}), loss, loop)
    ae = ema["vae"].float().cpu().eval()
    probe = tuning_prompts(64 if p.name == "full" else 5, cfg.seed)  # training captions, new layouts
    latents = np.concatenate([A.encode(ae, np.stack([np.asarray(render(s, p.base_size)) for s in probe])),
                              *(A.encode(ae, np.asarray(render(s, p.image_size))[None]) for s in probe[:16])], axis=None)
    scaling = float(1.0 / latents.std())
    ae.register_to_config(scaling_factor=scaling)
    recon = {}  # per size: PSNR and ShapesEval of reconstructions (the ceiling the autoencoder puts on scores)
    for size in sorted({p.base_size, p.image_size}):
        shown = probe[: 32 if size <= 256 else 12] if p.name == "full" else probe
        images = np.stack([np.asarray(render(s, size)) for s in shown])
        with torch.no_grad():
            out = ae.decode(torch.from_numpy(A.encode(ae, images))).sample.clamp(-1, 1)
        decoded = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        psnr = float(10 * np.log10(255.0**2 / np.mean((decoded.astype(np.float64) - images) ** 2)))
        score = ShapesEval().evaluate(list(decoded), [s.caption for s in shown])
        recon[str(size)] = {"psnr_db": round(psnr, 2), "shapes_eval": score["overall"], "images": len(shown)}
    _atomic_dir(paths.stage("vae"), lambda tmp: ae.save_pretrained(tmp))
    return {**figures, "batch": batch, "crop": p.ae_crop, "scaling_factor": scaling,
            "latent_channels": p.ae_latent_channels, "factor": p.vae_factor, "reconstruction": recon}


def _train_captions(cfg: BuildConfig, paths: Paths) -> list[str]:
    return [r["caption"] for r in _rows(paths.stage("data") / "metadata.jsonl")]


def stage_text(cfg: BuildConfig, paths: Paths) -> dict:
    import torch
    from torch import nn

    from litedge.demo import caption_pretraining as C
    from litedge.demo import training as T

    _require(paths, "data")
    p, batch = cfg.p, cfg.batch_of("text")
    tokenizer = T.build_tokenizer(p.text_max_length)
    captions = sorted(set(_train_captions(cfg, paths)))
    ids, mask = T.tokenize(tokenizer, captions, p.text_max_length)
    labels = {k: torch.from_numpy(v) for k, v in C.label_arrays(captions, p.text_max_length).items()}

    def loss(model, step):
        idx = torch.from_numpy(T.step_rng(cfg.seed, step).integers(0, len(captions), batch))
        return C.caption_loss(model, ids[idx].to(cfg.device), mask[idx].to(cfg.device),
                              {k: v[idx].to(cfg.device) for k, v in labels.items()})

    model = nn.ModuleDict({"text_encoder": T.make_text_encoder(p, cfg.seed), "heads": C.CaptionHeads(p.text_width)})
    loop = T.LoopConfig(cfg.steps_of("text"), p.text_lr, min(p.warmup, cfg.steps_of("text")), p.ema, p.save_every,
                        cfg.resume, cfg.device, "text", cfg.seed, cfg.progress, p.final_lr)
    ema, figures = T.train_resumable(paths.run("text"), model, loss, loop)
    ema = ema.cpu().eval()
    held = [json.loads(line)["caption"] for line in paths.prompts.read_text().splitlines() if line.strip()]
    scores = {}
    for name, group in (("train", captions), ("eval", held)):
        g_ids, g_mask = T.tokenize(tokenizer, group, p.text_max_length)
        g_labels = {k: torch.from_numpy(v) for k, v in C.label_arrays(group, p.text_max_length).items()}
        scores[name] = C.evaluate(ema, g_ids, g_mask, g_labels)

    def fill(tmp: Path) -> None:
        ema["text_encoder"].save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")

    _atomic_dir(paths.stage("text"), fill)
    return {**figures, "batch": batch, "captions": len(captions), "accuracy": scores}


def _phase_data(cfg: BuildConfig, paths: Paths, size: int, scenes: int, ae) -> np.ndarray:
    """Scaled latents (N, C, size/32, size/32) float16 of the first ``scenes`` training scenes at ``size`` px,
    cached in runs/teacher/latents-SIZE.npy (rendered here: the scenes are a function of the seed)."""
    from tqdm import tqdm

    from litedge.demo import autoencoder as A
    from litedge.demo.shapes import render, training_scenes

    cache = paths.run("teacher") / f"latents-{size}.npy"
    if not cache.is_file():
        items = training_scenes(scenes, cfg.seed)
        f = cfg.p.vae_factor
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".latents-{size}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(scenes, cfg.p.ae_latent_channels, size // f, size // f))
        chunk = max(1, 16 * 256**2 // size**2)
        for i in tqdm(range(0, scenes, chunk), desc=f"latents {size}px", disable=not cfg.progress):
            images = np.stack([np.asarray(render(s, size)) for s in items[i:i + chunk]])
            out[i:i + len(images)] = A.encode(ae, images) * ae.config.scaling_factor
        out.flush()
        del out
        os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r")


def write_pipeline(out: Path, transformer, text_dir: Path, vae_dir: Path) -> Path:
    """A diffusers-style PixArt-Sigma pipeline directory (what load_model and lit-export read)."""
    from diffusers import DPMSolverMultistepScheduler

    from litedge.demo.training import PIXART_SIGMA_SCHEDULER
    from litedge.models.student import save_transformer, student_model_index

    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderDC"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}

    def fill(tmp: Path) -> None:
        save_transformer(transformer.float().cpu(), tmp / "transformer")
        shutil.copytree(vae_dir, tmp / "vae", ignore=shutil.ignore_patterns("done.json"))
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(text_dir / part, tmp / part)
        DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(student_model_index(index, transformer), indent=2))

    return _atomic_dir(out, fill)


def _caption_features(cfg: BuildConfig, paths: Paths, captions: list[str]):
    """The frozen T5's features of each distinct caption and of "": (table (K, L, D), mask (K, L), index of each)."""
    import torch
    from transformers import T5EncoderModel

    from litedge.demo import training as T

    tokenizer = T.build_tokenizer(cfg.p.text_max_length)
    encoder = T5EncoderModel.from_pretrained(paths.stage("text") / "text_encoder").eval()
    distinct = ["", *sorted(set(captions))]
    ids, mask = T.tokenize(tokenizer, distinct, cfg.p.text_max_length)
    with torch.no_grad():
        table = encoder(input_ids=ids, attention_mask=mask)[0].float()
    where = {c: i for i, c in enumerate(distinct)}
    return table, mask, np.array([where[c] for c in captions])


def _warm_start(transformer, source: Path) -> None:
    """Load a saved transformer's weights (a diffusers folder, e.g. a shipped or committed teacher) into
    ``transformer``: a new run continues from them with a fresh optimizer (a warm restart)."""
    import torch
    from diffusers import PixArtTransformer2DModel

    try:
        saved = PixArtTransformer2DModel.from_pretrained(source, torch_dtype=torch.float32)
        transformer.load_state_dict(saved.state_dict())
    except (OSError, RuntimeError, ValueError) as e:
        raise LitedgeError(f"--init-teacher {source}: not a transformer of this preset's shape ({str(e)[:160]}); "
                           "pass the transformer/ folder of a teacher built with the same preset") from None
    print(f"teacher: warm start from {source}", file=sys.stderr)


def stage_teacher(cfg: BuildConfig, paths: Paths) -> dict:
    import torch
    from diffusers import AutoencoderDC
    from torch import nn

    from litedge.demo import training as T
    from litedge.models.loading import load_model

    _require(paths, "data", "vae", "text")
    p, steps = cfg.p, cfg.steps_of("teacher")
    captions = _train_captions(cfg, paths)
    table, table_mask, caption_index = _caption_features(cfg, paths, captions)
    ae = AutoencoderDC.from_pretrained(paths.stage("vae")).eval()
    latents = {size: _phase_data(cfg, paths, size, min(scenes, len(captions)), ae)
               for size, _, _, scenes in p.teacher_phases}
    del ae
    base_batch = cfg.batch_of("teacher")

    def loss(model, step):
        size, batch, _ = T.phase_of(p, steps, step)
        batch = base_batch if size == p.base_size else batch
        arrays = {"latents": latents[size], "caption": caption_index[: len(latents[size])]}
        b = T.sample_batch(arrays, batch, step, cfg.seed)
        idx = b["caption"]
        data = {"latents": b["latents"].float().to(cfg.device), "text": table[idx].to(cfg.device),
                "mask": table_mask[idx].to(cfg.device), "empty_mask": table_mask[:1].to(cfg.device)}
        return T.teacher_loss(model["transformer"], data, table[:1], T.step_generator(cfg.seed, step), p, size)

    model = nn.ModuleDict({"transformer": T.make_teacher(p, cfg.seed)})
    if cfg.init_teacher is not None and T.latest_checkpoint(paths.run("teacher")) is None:
        _warm_start(model["transformer"], Path(cfg.init_teacher))
    loop = T.LoopConfig(steps, p.teacher_lr, p.warmup, p.ema, p.save_every, cfg.resume, cfg.device,
                        "teacher", cfg.seed, cfg.progress, p.final_lr)
    ema, figures = T.train_resumable(paths.run("teacher"), model, loss, loop)
    write_pipeline(paths.stage("teacher"), ema["transformer"], paths.stage("text"), paths.stage("vae"))
    loaded = load_model(paths.stage("teacher"))  # reload what was written
    params = sum(t.numel() for t in loaded.transformer.parameters())
    phases = [{"size": size, "batch": base_batch if size == p.base_size else batch, "scenes": len(latents[size]),
               "tokens": (size // p.vae_factor) ** 2,
               "steps": sum(T.phase_of(p, steps, s)[0] == size for s in range(steps))}
              for size, _, batch, _ in p.teacher_phases]
    return {**figures, "phases": phases, "transformer_params": params, "width": p.width, "layers": p.layers}


def _student_data(cfg: BuildConfig, paths: Paths, size: int, scenes: int) -> Path:
    """runs/student/data-SIZE.jsonl: training images at ``size`` px (the base size: the data stage's PNGs;
    others rendered once into runs/student/images-SIZE/) with the teacher's caption dropout ("" 10%)."""
    from litedge.demo.shapes import render, training_scenes

    run = paths.run("student")
    data = run / f"data-{size}.jsonl"
    rows = _rows(paths.stage("data") / "metadata.jsonl")[:scenes]
    if size == cfg.p.data_size:
        files = [paths.stage("data") / r["file"] for r in rows]
    else:
        folder = run / f"images-{size}"
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / r["file"] for r in rows]
        for scene, file in zip(training_scenes(len(rows), cfg.seed), files):
            if not file.is_file():
                tmp = file.with_name(f".{file.name}.tmp.png")
                render(scene, size).save(tmp)
                os.replace(tmp, file)
    drop = np.random.default_rng(cfg.seed).random(len(rows)) < cfg.p.caption_dropout
    data.write_text("".join(json.dumps({"path": os.path.relpath(f, run), "caption": "" if d else r["caption"]}) + "\n"
                            for f, r, d in zip(files, rows, drop)))
    return data


def stage_student(cfg: BuildConfig, paths: Paths) -> dict:
    """lit-distill in phases (Preset.student_phases): most steps at the base size, then a resumed run at 1024 px."""
    from litedge.demo import training as T
    from litedge.distill import DistillConfig, distill
    from litedge.distill.checkpoint import find_latest
    from litedge.models.loading import load_model

    _require(paths, "data", "teacher")
    p, run = cfg.p, paths.run("student")
    run.mkdir(parents=True, exist_ok=True)
    steps, cuda = cfg.steps_of("student"), cfg.device.startswith("cuda")
    phases, result = [], None
    start = time.perf_counter()
    ends = T.phase_ends(p.student_phases, steps)
    for i, ((size, _, batch, scenes), phase_end) in enumerate(zip(p.student_phases, ends)):
        batch = cfg.batch_of("student") if size == p.data_size else batch
        latest = find_latest(run)
        done = int(json.loads((latest / "state.json").read_text())["step"]) if latest is not None else 0
        phases.append({"size": size, "batch": batch, "until_step": phase_end})
        if done >= phase_end and i < len(p.student_phases) - 1:
            continue
        config = DistillConfig(
            teacher=str(paths.stage("teacher")), family="lit", data=str(_student_data(cfg, paths, size, scenes)),
            out=str(run), resolution=size, steps=phase_end, batch=batch, lr=p.student_lr, ema=p.ema,
            save_every=p.save_every, seed=cfg.seed, resume=latest is not None and (cfg.resume or i > 0),
            heads=p.student_heads, text_max_length=p.text_max_length, device=cfg.device,
            precision="bf16" if cuda else "fp32", progress=cfg.progress)
        result = distill(config)
    seconds = time.perf_counter() - start
    _atomic_dir(paths.stage("student"), lambda tmp: shutil.copytree(result.student_dir, tmp, dirs_exist_ok=True))
    loaded = load_model(paths.stage("student"))
    if loaded.family != "lit":
        raise LitedgeError(f"{paths.stage('student')} holds a {loaded.family} model, expected a lit student")
    rates = _column(run / "losses.csv", "steps_per_s")
    return {"steps": result.step, "phases": phases, "seconds_incl_cache": round(seconds, 2),
            "steps_per_s": round(float(np.median(rates)), 3) if rates else None,
            "final_losses": result.losses, "heads": p.student_heads, "family": loaded.family}


def stage_export(cfg: BuildConfig, paths: Paths) -> dict:
    from litedge.bundle import verify_bundle
    from litedge.export.bundle_export import ExportConfig, export_bundle

    _require(paths, "teacher", "student")
    figures = {}
    for name in BUNDLES:
        model, precision = name.split("-")
        out = paths.bundle(name)
        try:  # an interrupted run's bundle, complete and newer than its model: keep it
            verify_bundle(out)
            if not _newer(out / "manifest.json", paths.done(model)):
                raise LitedgeError("stale")
        except (LitedgeError, OSError):
            print(f"export: {name}", file=sys.stderr)
            export_bundle(ExportConfig(out=out, source=paths.stage(model), target="cpu",
                                       weights="fp" if precision == "fp32" else "int4",
                                       text_max_length=cfg.p.text_max_length, steps=cfg.p.eval_steps,
                                       guidance_scale=cfg.p.guidance, trained_sizes=tuple(cfg.p.trained_sizes),
                                       force=True))
        manifest = verify_bundle(out)
        figures[name] = {"mb": round(_dir_bytes(out) / 2**20, 3), "fidelity": manifest.fidelity}
    return figures


def _generate(bundle: Path, captions: list[str], p, size: int, progress: bool) -> list:
    from tqdm import tqdm

    from litedge.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, device="cpu")
    return [pipe(c, height=size, width=size, steps=p.eval_steps, guidance_scale=p.guidance, seed=i,
                 progress=False)[0]
            for i, c in enumerate(tqdm(captions, desc=f"{bundle.name} {size}px", disable=not progress))]


def _grid(path: Path, images: dict[str, list], captions: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), len(captions)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for r, (name, row) in enumerate(images.items()):
        for c, image in enumerate(row[:cols]):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(captions[c].split(" to the ", 1) if " to the " in captions[c] else [captions[c]]),
                             fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


EVAL_ORDER = ("student-int4", "teacher-fp32", "student-fp32", "teacher-int4")  # what an interrupted eval has first


def _eval_part(cfg: BuildConfig, paths: Paths, name: str, size: int, captions: list[str]) -> dict | None:
    """ShapesEval of one bundle at one size, cached in eval/NAME-SIZE.json; computed only when selected."""
    from litedge.demo.shapes_eval import ShapesEval

    part = paths.stage("eval") / f"{name}-{size}.json"
    selected = (cfg.eval_sizes is None or size in cfg.eval_sizes) and (cfg.eval_bundles is None or name in cfg.eval_bundles)
    if part.is_file():
        data = json.loads(part.read_text())
        stale = not _newer(part, paths.bundle(name) / "manifest.json") or (selected and data["prompts"] != len(captions))
        if not stale:
            return data
        part.unlink()
    if not selected:
        return None
    start = time.perf_counter()
    images = _generate(paths.bundle(name), captions, cfg.p, size, cfg.progress)
    seconds = time.perf_counter() - start
    data = {"shapes_eval": ShapesEval().evaluate(images, captions), "prompts": len(captions), "size": size,
            "generate_seconds": round(seconds, 1), "seconds_per_image": round(seconds / len(captions), 2)}
    _write_json(part, data)
    return data


def stage_eval(cfg: BuildConfig, paths: Paths) -> dict:
    """ShapesEval per (bundle, size) and latency per bundle, each part saved as it finishes.

    ``--eval-sizes`` / ``--eval-bundles`` compute only some parts (an eval split over several runs or
    processes); the report covers every part present, and a check whose parts are missing is null.
    """
    from litedge.profile.measure import profile_bundle

    _require(paths, "data", "export")
    p = cfg.p
    captions = [r["caption"] for r in _rows(paths.prompts)]
    captions = captions[: cfg.eval_prompts or len(captions)]
    shown = captions[: p.grid_prompts]
    results = {name: {} for name in EVAL_ORDER}
    for size in p.eval_sizes:
        for name in EVAL_ORDER:
            part = _eval_part(cfg, paths, name, size, captions)
            if part is not None:
                results[name][str(size)] = part
    for name in EVAL_ORDER:
        part = paths.stage("eval") / f"{name}-latency.json"
        wanted = cfg.latency and (cfg.eval_bundles is None or name in cfg.eval_bundles)
        if wanted and (not part.is_file() or _newer(paths.bundle(name) / "manifest.json", part)):
            latency = profile_bundle(paths.bundle(name), [(s, s) for s in p.latency_sizes], repeat=p.latency_repeat)
            _write_json(part, latency.to_json())
        if part.is_file():
            results[name]["latency"] = json.loads(part.read_text())
    if cfg.grid:
        _grid(paths.grid, {n: _generate(paths.bundle(n), shown, p, p.image_size, cfg.progress) for n in EVAL_ORDER},
              shown)
    native = str(p.image_size)
    overall = {n: {size: r["shapes_eval"]["overall"] for size, r in results[n].items() if size != "latency"}
               for n in EVAL_ORDER}

    def score(name: str, size: str = native) -> float | None:
        return overall[name].get(size)

    def check(condition, *values):
        return None if any(v is None for v in values) else bool(condition(*values))

    cats = results["student-int4"].get(native, {}).get("shapes_eval", {}).get("per_category", {})
    checks = {
        f"student_int4_at_least_0.80_at_{native}": check(lambda a: a >= 0.80, score("student-int4")),
        "student_int4_at_least_0.70_at_2048": check(lambda a: a >= 0.70, score("student-int4", "2048")),
        f"colours_and_position_at_least_0.6_at_{native}": check(lambda a, b: min(a, b) >= 0.6, cats.get("colours"),
                                                                cats.get("position")),
        "student_within_0.05_of_teacher": check(lambda a, b: abs(a - b) <= 0.05, score("student-fp32"),
                                                score("teacher-fp32")),
        "student_int4_within_0.03_of_fp32": check(lambda a, b: abs(a - b) <= 0.03, score("student-int4"),
                                                  score("student-fp32")),
        "teacher_int4_within_0.03_of_fp32": check(lambda a, b: abs(a - b) <= 0.03, score("teacher-int4"),
                                                  score("teacher-fp32")),
    }
    report = {"settings": {"prompts": {n: {s: r["prompts"] for s, r in v.items() if s != "latency"}
                                       for n, v in results.items()},
                           "steps": p.eval_steps, "guidance_scale": p.guidance, "sizes": list(p.eval_sizes),
                           "native_size": p.image_size, "seeds": "prompt index",
                           "runtime": "litedge.runtime (onnxruntime CPU)"},
              "overall": overall, "checks": checks, "target_met": all(v is True for v in checks.values()),
              "models": results}
    _write_json(paths.eval_json, report)
    return {"overall": overall, "checks": checks, "eval_json": str(paths.eval_json), "grid": str(paths.grid)}


def stage_ship(cfg: BuildConfig, paths: Paths) -> dict:
    from litedge.bundle import verify_bundle

    _require(paths, "export", "eval")
    bundle, pipeline = paths.bundle("student-int4"), paths.stage("student")
    bundle_bytes, pipeline_bytes = _dir_bytes(bundle), _dir_bytes(pipeline)
    if bundle_bytes > SHIP_LIMIT_BYTES:
        raise LitedgeError(f"{bundle} is {bundle_bytes / 2**20:.1f} MB, over the 25 MB the repository holds: "
                           "train a smaller model (Preset width/layers)")
    dest = Path(cfg.ship_to)
    shipped = {"shapes-lit.litedge": bundle_bytes}
    _atomic_dir(dest / "shapes-lit.litedge", lambda tmp: shutil.copytree(bundle, tmp, dirs_exist_ok=True))
    verify_bundle(dest / "shapes-lit.litedge")
    if bundle_bytes + pipeline_bytes <= SHIP_LIMIT_BYTES:
        _atomic_dir(dest / "shapes-lit", lambda tmp: shutil.copytree(
            pipeline, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("done.json")))
        shipped["shapes-lit"] = pipeline_bytes
    # The teacher's transformer too, when it fits: the slowest stage to redo, and with shapes-lit/'s
    # vae, text encoder and tokenizer (the student's are the teacher's) it is the whole teacher.
    teacher = paths.stage("teacher") / "transformer"
    teacher_bytes = _dir_bytes(teacher)
    reports = paths.eval_json.stat().st_size + paths.grid.stat().st_size  # copied below
    if "shapes-lit" in shipped and sum(shipped.values()) + teacher_bytes + reports <= SHIP_LIMIT_BYTES:
        _atomic_dir(dest / "shapes-teacher-transformer", lambda tmp: shutil.copytree(teacher, tmp, dirs_exist_ok=True))
        shipped["shapes-teacher-transformer"] = teacher_bytes
    for src, name in ((paths.eval_json, "shapes-lit-eval.json"), (paths.grid, "shapes-lit-samples.png")):
        shutil.copy2(src, dest / name)
        shipped[name] = (dest / name).stat().st_size
    total = sum(shipped.values())
    for name, size in shipped.items():
        print(f"ship: {dest / name}  {size / 2**20:.2f} MB")
    print(f"ship: total {total / 2**20:.2f} MB (limit 25 MB)")
    return {"dest": str(dest), "mb": {k: round(v / 2**20, 3) for k, v in shipped.items()},
            "total_mb": round(total / 2**20, 3), "pipeline_shipped": "shapes-lit" in shipped}


RUNNERS = {"data": stage_data, "vae": stage_vae, "text": stage_text, "teacher": stage_teacher, "student": stage_student,
           "export": stage_export, "eval": stage_eval, "ship": stage_ship}


# ----------------------------------------------------------------------------- driver


def is_done(cfg: BuildConfig, paths: Paths, stage: str) -> bool:
    """done.json exists (and for a training stage, at no fewer steps than asked, unless not resuming)."""
    done = paths.done(stage)
    if not done.is_file():
        return False
    if stage == "eval" and (cfg.eval_sizes is not None or cfg.eval_bundles is not None):
        return False  # a selected part is computed (or found in its cache): the report is rebuilt
    if stage in TRAINING and cfg.resume and json.loads(done.read_text()).get("steps", 0) < cfg.steps_of(stage):
        return False  # --resume to more steps: continue the run
    return True


def run_stage(cfg: BuildConfig, stage: str) -> dict:
    """Run one stage unless done; returns its figures (done.json's content)."""
    paths = Paths(Path(cfg.workdir))
    if cfg.force:
        for path in (paths.stage(stage), paths.run(stage)):
            shutil.rmtree(path, ignore_errors=True)
    elif is_done(cfg, paths, stage):
        more = " (--resume --steps N continues it)" if stage in TRAINING else ""
        print(f"{stage}: done ({paths.done(stage)}); --force redoes it{more}", file=sys.stderr)
        return json.loads(paths.done(stage).read_text())
    for later in STAGES[STAGES.index(stage):]:  # this stage and all that depend on it are no longer done
        paths.done(later).unlink(missing_ok=True)
    print(f"{stage}: start", file=sys.stderr)
    start = time.perf_counter()
    figures = RUNNERS[stage](cfg, paths)
    figures = {"stage": stage, "preset": cfg.preset, "device": cfg.device, **figures,
               "stage_seconds": round(time.perf_counter() - start, 2),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(paths.done(stage), figures)
    print(f"{stage}: done in {figures['stage_seconds']:.1f} s -> {paths.done(stage)}", file=sys.stderr)
    return figures


def build(cfg: BuildConfig, stage: str) -> dict[str, dict]:
    """Run ``stage`` (or every stage in order for "all"); returns each stage's figures."""
    if stage not in (*STAGES, "all"):
        raise LitedgeError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)} or all")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return {s: run_stage(cfg, s) for s in (STAGES if stage == "all" else (stage,))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m litedge.demo.build", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--workdir", type=Path, required=True, help="build directory (checkpoints, artifacts, done.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (training stages)")
    p.add_argument("--steps", type=int, help="training steps of the vae / teacher / student stage (default: preset)")
    p.add_argument("--batch", type=int, help="batch size of the training stages (default: preset)")
    p.add_argument("--samples", type=int, help="training images (default: preset, 25000)")
    p.add_argument("--eval-prompts", type=int, help="evaluate on the first N held-out prompts (default: all, 250)")
    p.add_argument("--eval-sizes", help="eval: compute only these sizes, e.g. 1024,256 (default: the preset's)")
    p.add_argument("--eval-bundles", help=f"eval: compute only these bundles, e.g. student-int4 (of {', '.join(BUNDLES)})")
    p.add_argument("--no-latency", action="store_true", help="eval: skip the latency measurement")
    p.add_argument("--no-grid", action="store_true", help="eval: skip the sample grid")
    p.add_argument("--init-teacher", type=Path,
                   help="teacher: start a new run from this transformer folder's weights (e.g. a committed teacher)")
    p.add_argument("--resume", action="store_true", help="continue a training stage from its newest checkpoint")
    p.add_argument("--force", action="store_true", help="delete the stage's outputs and run it again")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and 3 steps (tests)")
    p.add_argument("--ship-to", type=Path, default=MODEL_DIR,
                   help="ship destination (default: the package's litedge/demo/model/, lit-generate's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())  # "": no size (e.g. latency only)
    except ValueError:
        raise SystemExit(f"--eval-sizes {text}: expected comma-separated pixel sizes, e.g. 1024,256") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in BUNDLES]
    if unknown:
        raise SystemExit(f"--eval-bundles {text}: unknown {', '.join(unknown)}; expected some of {', '.join(BUNDLES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "samples", "threads", "eval_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} {value}: expected >= 1")
    cfg = BuildConfig(workdir=args.workdir, preset="tiny" if args.tiny else "full", device=args.device,
                      steps=args.steps, batch=args.batch, samples=args.samples, eval_prompts=args.eval_prompts,
                      eval_sizes=_ints(args.eval_sizes), eval_bundles=_names(args.eval_bundles),
                      latency=not args.no_latency, grid=not args.no_grid,
                      init_teacher=args.init_teacher, resume=args.resume, force=args.force,
                      ship_to=args.ship_to, seed=args.seed, threads=args.threads,
                      progress=not args.no_progress)
    return run_command("litedge.demo.build", lambda: (build(cfg, args.stage), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
