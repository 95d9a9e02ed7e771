"""lit-profile: measure bundles' latency per component, size and operator group on this device."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from litedge.cli import HelpFormatter, add_common_args, parse_args, run_command


def _sizes(text: str) -> list[tuple[int, int]]:
    """'512,1024,768x1344' -> [(512, 512), (1024, 1024), (768, 1344)] (height x width)."""
    sizes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            h, sep, w = item.partition("x")
            if sep and not w.strip():
                raise ValueError(item)
            sizes.append((int(h), int(w or h)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 512,1024,768x1344, got {item!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected sizes like 512,1024,768x1344, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-profile",
        description="Measure the latency of litedge bundles on this device: text encoder, one transformer step "
        "and VAE decode per image size (median, min-max over repeats after a warm-up), an end-to-end estimate "
        "for the bundle's default step count, and peak memory. Several bundles are compared side by side.",
        epilog="example: lit-profile teacher.litedge lit.litedge --sizes 512,1024,2048 --ops --plot latency.png",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("bundles", nargs="+", type=Path, help="bundle directories; ratios are against the first")
    parser.add_argument("--sizes", type=_sizes, default=[(512, 512), (1024, 1024)],
                        help="image sizes in px: 512,1024 or HxW (default 512,1024)")
    parser.add_argument("--steps", type=int, default=2, help="transformer calls per timed repeat")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, directml, qnn")
    parser.add_argument("--ops", action="store_true", help="break transformer time down by operator group")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="report format on stdout")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the JSON report here")
    parser.add_argument("--csv", dest="csv_out", type=Path, help="also write the CSV report here")
    parser.add_argument("--plot", type=Path, help="write a PNG: latency vs resolution (log-log) and op shares")
    return add_common_args(parser)


def _write(path: Path, text: str) -> None:
    from litedge.profile.report import write_report

    write_report(path, text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    def body() -> int:
        from tqdm import tqdm

        from litedge.profile import report
        from litedge.profile.measure import profile_bundle

        report.check_outputs(args.json_out, args.csv_out, args.plot)  # before minutes of measuring

        profiles = []
        for bundle in tqdm(args.bundles, desc="profiling", unit="bundle", disable=len(args.bundles) < 2 or args.quiet,
                           file=sys.stderr):
            profiles.append(profile_bundle(bundle, args.sizes, repeat=args.repeat, steps=args.steps,
                                           device=args.device, ops=args.ops))
        print({"table": report.to_table, "json": report.to_json, "csv": report.to_csv}[args.format](profiles))
        if args.json_out:
            _write(args.json_out, report.to_json(profiles))
        if args.csv_out:
            _write(args.csv_out, report.to_csv(profiles))
        if args.plot:
            from litedge.profile.plot import plot_profiles

            plot_profiles(profiles, args.plot)
            logging.getLogger("litedge.profile").info(f"plot: {args.plot}")
        return 0

    return run_command("lit-profile", body, args)


if __name__ == "__main__":
    raise SystemExit(main())
