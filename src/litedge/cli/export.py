"""lit-export: turn a LiT / EDiT / MM-EDiT checkpoint (or its teacher) into a device bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from litedge.cli import THIRD_PARTY, HelpFormatter, add_common_args, parse_args, run_command
from litedge.errors import LitedgeError
from litedge.export.targets import TARGETS
from litedge.export.validate import output_path, require_export_extras


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated pixel sizes like 512,1024, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-export",
        description="Export a diffusion transformer (a diffusers pipeline directory, a litedge student, "
        "a .safetensors or an original PixArt/DiT/LiT .pth) to a NAME.litedge bundle that lit-generate "
        "runs offline. The bundle is written to a temporary folder and moved into place when complete.",
        epilog="example: lit-export ./lit-student --target cpu --weights int4 -o lit.litedge",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", nargs="?", type=Path, help="model to export (omit with --config/--random-weights)")
    parser.add_argument("--config", dest="config_name", help="a named config (e.g. LiT-T2I-XL, tiny-LiT-T2I-XL) ...")
    parser.add_argument("--random-weights", action="store_true", help="... exported with random weights, for latency profiling")
    parser.add_argument("--target", default="cpu", help=f"device kind: {', '.join(TARGETS)}")
    parser.add_argument("--weights", choices=("fp", "int4", "int8"), help="weight format (default: the target's, int4 on cpu)")
    parser.add_argument("--text-encoder-weights", choices=("fp", "int4", "int8"),
                        help="weight format of the text encoders (T5, CLIP), e.g. int8 or fp for a more precise encoder "
                        "than the transformer (default: as --weights)")
    parser.add_argument("--keep-fp", action="append", default=[], metavar="LAYER",
                        help="keep a layer (name or glob, e.g. 'proj_out') in full precision; repeatable")
    parser.add_argument("--sizes", type=_sizes, default=(),
                        help="image sizes in px for static-shape targets, e.g. 512,1024 (default: none; dynamic targets need none)")
    parser.add_argument("--trained-sizes", type=_sizes, default=(), metavar="SIZES",
                        help="image sizes in px the model was trained at, e.g. 256,512,1024, recorded in the manifest "
                        "(lit-generate warns for sizes far from them; default: the transformer config's trained_sizes, "
                        "else its native size sample_size x VAE factor)")
    parser.add_argument("--native-size", type=int, metavar="PX",
                        help="the square size lit-generate makes when not told, e.g. 1024 (default: the transformer "
                        "config's native_size, else sample_size x VAE factor)")
    parser.add_argument("--soc", help="snapdragon: SoC to compile for, e.g. sm8650 or sm8750")
    parser.add_argument("--hub", dest="hub_device", metavar="DEVICE",
                        help="snapdragon: also compile and profile on this Qualcomm AI Hub device (needs a qai-hub token)")
    parser.add_argument("--text-max-length", type=int, help="prompt tokens (default: the base model's, 300 for PixArt-Sigma)")
    parser.add_argument("--steps", type=int, help="default denoising steps recorded in the bundle (default: the base "
                        "pipeline's, 20 for PixArt-Sigma); lit-generate --steps overrides it")
    parser.add_argument("--guidance", type=float, dest="guidance_scale",
                        help="default classifier-free guidance scale recorded in the bundle (default: the base "
                        "pipeline's, 4.5 for PixArt-Sigma); lit-generate --guidance overrides it")
    parser.add_argument("--teacher", action="store_true",
                        help="export the softmax teacher (of --config NAME, or a softmax SOURCE) as the speed baseline; "
                        "its attention runs in query chunks, so 2048 px fits in a few GB")
    parser.add_argument("-o", "--output", dest="out", type=output_path, required=True, help="bundle directory to write (NAME.litedge)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at the output path")
    return add_common_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    def body() -> int:
        require_export_extras()  # one line naming litedge[export], before any import of torch
        from litedge.export.bundle_export import ExportConfig, export_bundle

        if args.random_weights != (args.config_name is not None):
            raise LitedgeError("--config NAME and --random-weights go together (export an architecture untrained)")
        if (args.source is None) == (args.config_name is None):
            raise LitedgeError("give either a SOURCE or --config NAME --random-weights, not both or neither")
        cfg = ExportConfig(
            out=args.out, source=args.source, config_name=args.config_name, target=args.target, weights=args.weights,
            text_encoder_weights=args.text_encoder_weights,
            sizes=args.sizes, keep_fp=tuple(args.keep_fp), soc=args.soc, hub_device=args.hub_device, force=args.force,
            text_max_length=args.text_max_length, steps=args.steps, guidance_scale=args.guidance_scale,
            teacher=args.teacher, trained_sizes=args.trained_sizes, native_size=args.native_size,
        )
        report = export_bundle(cfg)
        for name, fid in report.fidelity.items():
            if "skipped" in fid:
                print(f"{name}: fidelity check skipped: {fid['skipped']}")
            elif "rel_err" in fid:
                print(f"{name}: max_abs_err {fid.get('max_abs_err', float('nan')):.3g}, rel_err {fid['rel_err']:.3g} "
                      f"vs {fid.get('vs', '?')}")
        print(report.path)
        return 0

    return run_command("lit-export", body, args, THIRD_PARTY)


if __name__ == "__main__":
    raise SystemExit(main())
