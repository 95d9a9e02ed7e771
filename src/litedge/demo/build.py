"""Build the demo model from scratch, one resumable command per stage.

    python -m litedge.demo.build all --workdir runs/demo --device cuda --resume
    python -m litedge.demo.build teacher --workdir runs/demo --steps 20000 --resume

Stages (``all`` runs them in order and skips the ones already done):

    data     the shapes dataset (PNG + .txt captions, pixels.npy) and held-out eval prompts
    vae      AutoencoderKL f4 trained on it; scaling_factor = 1 / latent std     -> DIR/vae/
    teacher  PixArt-Sigma-style transformer + tiny T5, trained jointly            -> DIR/teacher/
    student  lit-distill (family lit, 2 heads) from the teacher                   -> DIR/student/
    export   teacher and student, fp32 and int4 CPU bundles                       -> DIR/bundles/
    eval     ShapesEval on held-out prompts through the torch-free runtime, latency
             at 256 and 512 px, a sample grid                          -> DIR/eval.json, DIR/samples.png
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

STAGES = ("data", "vae", "teacher", "student", "export", "eval", "ship")
TRAINING = {"vae": "vae_steps", "teacher": "teacher_steps", "student": "student_steps"}
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
    """Training images + captions (write_dataset), pixels.npy (N, H, W, 3) uint8, eval prompts."""
    from PIL import Image

    p, out = cfg.p, paths.stage("data")
    write_dataset(out, p.samples, cfg.seed, p.image_size)
    rows = _rows(out / "metadata.jsonl")
    tmp = paths.pixels.with_name(".pixels.tmp.npy")
    pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), p.image_size, p.image_size, 3))
    for i, row in enumerate(rows):
        with Image.open(out / row["file"]) as im:
            pixels[i] = np.asarray(im.convert("RGB"))
    pixels.flush()
    del pixels
    os.replace(tmp, paths.pixels)
    scenes = eval_prompts(p.eval_prompts, cfg.seed)
    paths.prompts.write_text("".join(json.dumps({"caption": s.caption, "category": s.category}) + "\n" for s in scenes))
    return {"samples": len(rows), "eval_prompts": len(scenes), "image_size": p.image_size,
            "eval_per_category": {c: sum(s.category == c for s in scenes) for c in CATEGORIES}}


def stage_vae(cfg: BuildConfig, paths: Paths) -> dict:
    import torch
    from torch import nn

    from litedge.demo import training as T
    from litedge.demo.shapes_eval import ShapesEval

    _require(paths, "data")
    p, pixels = cfg.p, np.load(paths.pixels, mmap_mode="r")
    batch = cfg.batch_of("vae")

    def loss(model, step):
        x = T.to_unit(T.sample_batch({"x": pixels}, batch, step, cfg.seed)["x"]).to(cfg.device)
        return T.vae_loss(model, x, T.step_generator(cfg.seed, step), p)

    loop = T.LoopConfig(cfg.steps_of("vae"), p.vae_lr, p.warmup, p.ema, p.save_every, cfg.resume, cfg.device, "vae",
                        cfg.seed, cfg.progress)
    ema, figures = T.train_resumable(paths.run("vae"), nn.ModuleDict({"vae": T.make_vae(p, cfg.seed)}), loss, loop)
    vae = ema["vae"].float().eval()
    probe = pixels[: min(len(pixels), 2048)]
    latents = T.encode_latents(vae, probe, 64, cfg.device, cfg.progress)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():  # reconstructions: the ceiling the VAE puts on every later score
        n = min(len(pixels), 100)
        recon = vae.decode(torch.from_numpy(latents[:n]).to(cfg.device)).sample.clamp(-1, 1)
        images = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    captions = [r["caption"] for r in _rows(paths.stage("data") / "metadata.jsonl")[:n]]
    psnr = float(10 * np.log10(255.0**2 / np.mean((images.astype(np.float64) - probe[:n]) ** 2)))
    _atomic_dir(paths.stage("vae"), lambda tmp: vae.cpu().save_pretrained(tmp))
    return {**figures, "batch": batch, "scaling_factor": scaling, "latent_shape": list(latents.shape[1:]),
            "recon_psnr_db": round(psnr, 2), "recon_shapes_eval": ShapesEval().evaluate(list(images), captions)}


def _teacher_data(cfg: BuildConfig, paths: Paths, tokenizer) -> dict[str, np.ndarray]:
    """Scaled VAE latents (cached in runs/teacher/latents.npy) and token ids + masks of every caption."""
    from diffusers import AutoencoderKL

    from litedge.demo import training as T

    cache = paths.run("teacher") / "latents.npy"
    if not cache.is_file():
        vae = AutoencoderKL.from_pretrained(paths.stage("vae"))
        latents = T.encode_latents(vae, np.load(paths.pixels, mmap_mode="r"), 256, cfg.device, cfg.progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(".latents.tmp.npy")
        np.save(tmp, (latents * vae.config.scaling_factor).astype(np.float32))
        os.replace(tmp, cache)
    captions = [r["caption"] for r in _rows(paths.stage("data") / "metadata.jsonl")]
    ids, mask = T.tokenize(tokenizer, captions, cfg.p.text_max_length)
    return {"latents": np.load(cache, mmap_mode="r"), "ids": ids.numpy(), "mask": mask.numpy()}


def write_pipeline(out: Path, transformer, text_encoder, tokenizer, vae_dir: Path) -> Path:
    """A diffusers-style PixArt-Sigma pipeline directory (what load_model and lit-export read)."""
    from diffusers import DPMSolverMultistepScheduler

    from litedge.demo.training import PIXART_SIGMA_SCHEDULER
    from litedge.models.student import save_transformer, student_model_index

    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}

    def fill(tmp: Path) -> None:
        save_transformer(transformer.float().cpu(), tmp / "transformer")
        shutil.copytree(vae_dir, tmp / "vae", ignore=shutil.ignore_patterns("done.json"))
        text_encoder.float().cpu().save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(student_model_index(index, transformer), indent=2))

    return _atomic_dir(out, fill)


def stage_teacher(cfg: BuildConfig, paths: Paths) -> dict:
    from torch import nn

    from litedge.demo import training as T
    from litedge.models.loading import load_model

    _require(paths, "data", "vae")
    p = cfg.p
    tokenizer = T.build_tokenizer(p.text_max_length)
    arrays = _teacher_data(cfg, paths, tokenizer)
    empty = T.tokenize(tokenizer, [""], p.text_max_length)
    batch = cfg.batch_of("teacher")

    def loss(model, step):
        b = {k: v.to(cfg.device) for k, v in T.sample_batch(arrays, batch, step, cfg.seed).items()}
        return T.teacher_loss(model, b, empty, T.step_generator(cfg.seed, step), p)

    model = nn.ModuleDict({"transformer": T.make_teacher(p, cfg.seed), "text_encoder": T.make_text_encoder(p, cfg.seed)})
    loop = T.LoopConfig(cfg.steps_of("teacher"), p.teacher_lr, p.warmup, p.ema, p.save_every, cfg.resume, cfg.device,
                        "teacher", cfg.seed, cfg.progress, p.final_lr)
    ema, figures = T.train_resumable(paths.run("teacher"), model, loss, loop)
    write_pipeline(paths.stage("teacher"), ema["transformer"], ema["text_encoder"], tokenizer, paths.stage("vae"))
    loaded = load_model(paths.stage("teacher"))  # reload what was written
    params = sum(t.numel() for t in loaded.transformer.parameters())
    return {**figures, "batch": batch, "transformer_params": params, "width": p.width, "layers": p.layers,
            "tokens": (p.latent_size // 2) ** 2, "text_params": sum(t.numel() for t in ema["text_encoder"].parameters())}


def stage_student(cfg: BuildConfig, paths: Paths) -> dict:
    from litedge.distill import DistillConfig, distill
    from litedge.distill.checkpoint import find_latest
    from litedge.models.loading import load_model

    _require(paths, "data", "teacher")
    p, run = cfg.p, paths.run("student")
    run.mkdir(parents=True, exist_ok=True)
    data = run / "data.jsonl"  # the teacher's captions, with its caption dropout: the student learns "" too
    rng = np.random.default_rng(cfg.seed)
    rows = _rows(paths.stage("data") / "metadata.jsonl")
    drop = rng.random(len(rows)) < p.caption_dropout
    data.write_text("".join(json.dumps({"path": os.path.relpath(paths.stage("data") / r["file"], run),
                                        "caption": "" if d else r["caption"]}) + "\n" for r, d in zip(rows, drop)))
    cuda = cfg.device.startswith("cuda")
    config = DistillConfig(
        teacher=str(paths.stage("teacher")), family="lit", data=str(data), out=str(run), resolution=p.image_size,
        steps=cfg.steps_of("student"), batch=cfg.batch_of("student"), lr=p.student_lr, ema=p.ema,
        save_every=p.save_every, seed=cfg.seed, resume=cfg.resume and find_latest(run) is not None,
        heads=p.student_heads, text_max_length=p.text_max_length, device=cfg.device,
        precision="bf16" if cuda else "fp32", progress=cfg.progress)
    start = time.perf_counter()
    result = distill(config)
    seconds = time.perf_counter() - start
    _atomic_dir(paths.stage("student"), lambda tmp: shutil.copytree(result.student_dir, tmp, dirs_exist_ok=True))
    loaded = load_model(paths.stage("student"))
    if loaded.family != "lit":
        raise LitedgeError(f"{paths.stage('student')} holds a {loaded.family} model, expected a lit student")
    rates = _column(run / "losses.csv", "steps_per_s")
    return {"steps": result.step, "batch": config.batch, "seconds_incl_cache": round(seconds, 2),
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
                                       guidance_scale=cfg.p.guidance, force=True))
        manifest = verify_bundle(out)
        figures[name] = {"mb": round(_dir_bytes(out) / 2**20, 3), "fidelity": manifest.fidelity}
    return figures


def _generate(bundle: Path, captions: list[str], p, progress: bool) -> list:
    from tqdm import tqdm

    from litedge.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, device="cpu")
    return [pipe(c, height=p.image_size, width=p.image_size, steps=p.eval_steps, guidance_scale=p.guidance,
                 seed=i, progress=False)[0] for i, c in enumerate(tqdm(captions, desc=bundle.name, disable=not progress))]


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


def stage_eval(cfg: BuildConfig, paths: Paths) -> dict:
    from litedge.demo.shapes_eval import ShapesEval
    from litedge.profile.measure import profile_bundle

    _require(paths, "data", "export")
    p, judge = cfg.p, ShapesEval()
    captions = [r["caption"] for r in _rows(paths.prompts)]
    shown = captions[: p.grid_prompts]
    results, grid = {}, {}
    for name in BUNDLES:
        part = paths.stage("eval") / f"{name}.json"  # per bundle, so an interrupted eval resumes
        if part.is_file() and not _newer(part, paths.bundle(name) / "manifest.json"):
            part.unlink()
        images = _generate(paths.bundle(name), shown if part.is_file() else captions, p, cfg.progress)
        grid[name] = images[: len(shown)]
        if not part.is_file():
            start = time.perf_counter()
            score = judge.evaluate(images, captions)
            gen_s = time.perf_counter() - start
            latency = profile_bundle(paths.bundle(name), [(s, s) for s in p.latency_sizes], repeat=p.latency_repeat)
            _write_json(part, {"shapes_eval": score, "prompts": len(captions), "score_seconds": round(gen_s, 2),
                               "latency": latency.to_json()})
        results[name] = json.loads(part.read_text())
    _grid(paths.grid, grid, shown)
    overall = {n: r["shapes_eval"]["overall"] for n, r in results.items()}
    checks = {
        "student_fp32_at_least_0.6": overall["student-fp32"] >= 0.6,
        "student_within_0.05_of_teacher": abs(overall["student-fp32"] - overall["teacher-fp32"]) <= 0.05,
        "int4_within_0.05_of_fp32": all(abs(overall[f"{m}-int4"] - overall[f"{m}-fp32"]) <= 0.05
                                        for m in ("teacher", "student")),
    }
    report = {"settings": {"prompts": len(captions), "steps": p.eval_steps, "guidance_scale": p.guidance,
                           "size": p.image_size, "seeds": "prompt index", "runtime": "litedge.runtime (onnxruntime CPU)"},
              "overall": overall, "checks": checks, "target_met": all(checks.values()), "models": results}
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


RUNNERS = {"data": stage_data, "vae": stage_vae, "teacher": stage_teacher, "student": stage_student,
           "export": stage_export, "eval": stage_eval, "ship": stage_ship}


# ----------------------------------------------------------------------------- driver


def is_done(cfg: BuildConfig, paths: Paths, stage: str) -> bool:
    """done.json exists (and for a training stage, at no fewer steps than asked, unless not resuming)."""
    done = paths.done(stage)
    if not done.is_file():
        return False
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
    p.add_argument("--resume", action="store_true", help="continue a training stage from its newest checkpoint")
    p.add_argument("--force", action="store_true", help="delete the stage's outputs and run it again")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and 3 steps (tests)")
    p.add_argument("--ship-to", type=Path, default=MODEL_DIR,
                   help="ship destination (default: the package's litedge/demo/model/, lit-generate's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} {value}: expected >= 1")
    cfg = BuildConfig(workdir=args.workdir, preset="tiny" if args.tiny else "full", device=args.device,
                      steps=args.steps, batch=args.batch, samples=args.samples, resume=args.resume, force=args.force,
                      ship_to=args.ship_to, seed=args.seed, threads=args.threads,
                      progress=not args.no_progress)
    return run_command("litedge.demo.build", lambda: (build(cfg, args.stage), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
