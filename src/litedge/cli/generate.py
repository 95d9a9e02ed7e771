"""lit-generate: images from a litedge bundle on this machine (torch-free).

    lit-generate "a red fox in the snow" --bundle fox.litedge --size 1024 --steps 20 -o fox.png

Without --size/--height/--width it makes the bundle's default size, which lit-export sets to the
model's native size (sample_size x VAE factor). A size far from every size the manifest records
as ``trained_sizes`` (more than 2x the area away, :func:`litedge.runtime.info.trained_size_warning`)
still runs, with one warning line naming the trained sizes.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from litedge.cli import add_common_args, log_level, run_command
from litedge.demo import DEMO_BUNDLE
from litedge.errors import LitedgeError

DEVICES = ("auto", "cpu", "cuda", "directml", "qnn", "coreml")


@dataclass(frozen=True)
class GenerateConfig:
    """The command line, typed once."""

    bundle: Path
    prompt: str
    negative_prompt: str
    height: int | None
    width: int | None
    steps: int | None
    guidance_scale: float | None
    seed: int
    batch: int
    scheduler: str | None
    device: str
    low_memory: bool
    class_id: int | None
    quiet: bool
    outputs: tuple[Path, ...]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-generate", description="Generate images from a litedge bundle.")
    p.add_argument("prompt", nargs="?", default="", help="the text prompt (omit for class-conditional bundles)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="NAME.litedge directory made by lit-export (default: the shipped shapes demo model)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the bundle's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the bundle's native size)")
    p.add_argument("--size", type=int, help="square images of this many pixels (instead of --height/--width); "
                   "lit-info BUNDLE lists the sizes the model was trained at")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's, e.g. 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 disables (default: the bundle's)")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    p.add_argument("--batch", type=int, default=1, help="images to generate from this seed")
    p.add_argument("--scheduler", help=_scheduler_help())
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: the bundle's target if present)")
    p.add_argument("--low-memory", action="store_true", help="load one model component at a time")
    p.add_argument("--class", dest="class_id", type=int, help="class id for class-conditional (DiT-like) bundles")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", type=Path, help="PNG to write (with --batch N: NAME-0.png ... NAME-{N-1}.png)")
    out.add_argument("--output-dir", type=Path, help="folder to write PROMPT-SEED-I.png into")
    return add_common_args(p)  # -q/--quiet (no progress bar, warnings only), -v/--verbose, --version


def _scheduler_help() -> str:
    """Every scheduler name the runtime registers, by the kind of bundle it fits."""
    from litedge.runtime.schedulers import SCHEDULERS

    names = {cls.short_name: cls for cls in SCHEDULERS.values()}  # registry order
    noise = ", ".join(n for n, cls in names.items() if not cls.flow)
    flow = ", ".join(n for n, cls in names.items() if cls.flow)
    return (f"{noise} (noise-prediction bundles: PixArt, DiT); {flow} (flow matching: SD3, MM-EDiT); "
            "or a diffusers scheduler class name (default: the bundle's)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


def output_paths(output: Path | None, output_dir: Path | None, prompt: str, class_id: int | None,
                 seed: int, batch: int) -> tuple[Path, ...]:
    """Where each image of the batch goes."""
    if output is not None:
        if batch == 1:
            return (output,)
        return tuple(output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(batch))
    stem = _slug(prompt) if class_id is None else f"class-{class_id}"
    folder = output_dir if output_dir is not None else Path(".")
    return tuple(folder / f"{stem}-{seed}-{i}.png" for i in range(batch))


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    if args.size is not None and (args.height is not None or args.width is not None):
        raise LitedgeError("--size sets both sides: give either --size or --height/--width")
    height = args.size if args.size is not None else args.height
    width = args.size if args.size is not None else (args.width if args.width is not None else args.height)
    if args.width is not None and args.height is None:
        height = args.width
    bundle = args.bundle if args.bundle is not None else DEMO_BUNDLE
    if args.bundle is None and not (DEMO_BUNDLE / "manifest.json").is_file():
        raise LitedgeError(f"no bundle: pass --bundle PATH (a NAME.litedge folder made by lit-export); the demo "
                           f"bundle {DEMO_BUNDLE} is missing (python -m litedge.demo.build all rebuilds it)")
    if not isinstance(args.batch, int) or args.batch <= 0:
        raise LitedgeError(f"--batch must be a positive integer, got {args.batch}")
    return GenerateConfig(
        bundle=Path(bundle), prompt=args.prompt, negative_prompt=args.negative, height=height, width=width,
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch=args.batch, scheduler=args.scheduler,
        device=args.device, low_memory=args.low_memory, class_id=args.class_id, quiet=args.quiet,
        outputs=output_paths(args.output, args.output_dir, args.prompt, args.class_id, args.seed, args.batch),
    )


def generate(cfg: GenerateConfig) -> list[Path]:
    """Check the outputs are writable, generate, write the PNGs; returns their paths."""
    from litedge.runtime import Pipeline, save_png
    from litedge.runtime.image import check_writable

    for path in cfg.outputs:
        check_writable(path)  # before minutes of compute
    pipe = Pipeline.from_bundle(cfg.bundle, device=cfg.device, low_memory=cfg.low_memory)
    images = pipe(cfg.prompt, negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
                  steps=cfg.steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed, batch=cfg.batch,
                  scheduler=cfg.scheduler, class_id=cfg.class_id, progress=not cfg.quiet)
    return [save_png(image, path) for image, path in zip(images, cfg.outputs)]


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"lit-generate: {level}{record.getMessage()}"


def _log_to_stderr(quiet: bool) -> logging.Handler:
    """Runtime messages (device choice; warnings such as a truncated prompt) as one stderr line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("litedge")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        for path in generate(config_from_args(args)):
            print(path)
        return 0

    logger = logging.getLogger("litedge")
    level = logger.level
    handler = _log_to_stderr(args.quiet)
    logger.setLevel(log_level(args))  # litedge.cli's levels: -q warnings, -v debug, else info
    try:
        return run_command("lit-generate", body)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
