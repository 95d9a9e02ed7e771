"""lit-info: what a litedge bundle holds, without running it (torch-free).

    lit-info lit.litedge            # components, sizes, precision, target, buckets, fidelity, memory
    lit-info lit.litedge --json     # the same as JSON (litedge.runtime.bundle_info)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from litedge.cli import add_common_args, parse_args, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-info", description="Show what a litedge bundle holds: components and "
                                "their sizes, precision and weights, target, image sizes, fidelity, defaults "
                                "and the memory a generation needs.")
    p.add_argument("bundle", type=Path, help="NAME.litedge directory made by lit-export")
    p.add_argument("--json", action="store_true", help="print JSON (litedge.runtime.bundle_info) instead of text")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads every byte)")
    return add_common_args(p)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    def body() -> int:
        from litedge.runtime.info import bundle_info, format_info

        info = bundle_info(args.bundle, verify=args.verify)
        try:
            print(json.dumps(info, indent=2) if args.json else format_info(info), flush=True)
        except BrokenPipeError:  # `lit-info B | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    return run_command("lit-info", body, args)


if __name__ == "__main__":
    raise SystemExit(main())
