"""lit-export's request checks, run before anything is loaded or deleted (torch-free).

:func:`check_export_config` refuses, in one line each:

- an output that equals or contains the source (``lit-export o.litedge/p -o o.litedge
  --force`` would otherwise delete the source with the old bundle);
- an empty output path (``-o ''``), or one that names a folder such as ``.`` or ``..``;
- ``--text-max-length``, ``--steps`` and ``--guidance`` outside the bounds the bundle
  reader enforces (:data:`litedge.bundle.MAX_TEXT_LENGTH`, ``MAX_STEPS``, ``MAX_GUIDANCE``),
  so a bundle is never written that lit-generate would then refuse;
- ``--soc`` / ``--hub`` for a target that does not compile for a SoC (only snapdragon does).

It also checks that the optional dependencies an export needs are installed
(:func:`require_export_extras`), naming the extra to install.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from litedge.bundle import MAX_GUIDANCE, MAX_STEPS, MAX_TEXT_LENGTH
from litedge.errors import LitedgeError
from litedge.extras import EXPORT, require

SOC_TARGETS = ("snapdragon",)


def output_path(text: str | os.PathLike) -> Path:
    """argparse type of ``-o``: a non-empty path whose last part names the bundle."""
    text = os.fspath(text)
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("empty; give the bundle directory to write, e.g. -o out/model.litedge")
    path = Path(text)
    if path.name in ("", ".", "..") or text.rstrip().endswith(("/.", "/..")) or text.strip() in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder, not a bundle; give a new directory name "
                                         f"such as {(path / 'model.litedge').as_posix()}")
    return path


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(out: Path, source: Path | None) -> None:
    """Refuse an output that equals or contains the source (replacing it would delete the source)."""
    if source is None:
        return
    out_real = Path(os.path.realpath(out))
    src_real = Path(os.path.realpath(source))
    if _inside(src_real, out_real):
        raise LitedgeError(f"-o {out} contains the source {source}: writing the bundle would delete what it is "
                           "exported from; choose an output path outside the source")


def _int_in(name: str, value: Any, low: int, high: int, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LitedgeError(f"{name} {value!r}: expected {what} >= {low} and <= {high} (the most a bundle "
                           "may record)")


def check_values(text_max_length: Any, steps: Any, guidance_scale: Any) -> None:
    """The manifest values lit-export records, checked against the reader's bounds."""
    _int_in("--text-max-length", text_max_length, 1, MAX_TEXT_LENGTH, "prompt tokens")
    _int_in("--steps", steps, 1, MAX_STEPS, "a default step count")
    if guidance_scale is not None:
        ok = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool) \
            and math.isfinite(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE
        if not ok:
            raise LitedgeError(f"--guidance {guidance_scale!r}: expected a finite guidance scale >= 0 and "
                               f"<= {MAX_GUIDANCE:g} (1 = no guidance; 3-8 is usual)")


def check_target_options(target: str, soc: str | None, hub_device: str | None) -> None:
    """--soc and --hub mean something only for a SoC target."""
    if target in SOC_TARGETS:
        return
    for flag, value in (("--soc", soc), ("--hub", hub_device)):
        if value is not None:
            raise LitedgeError(f"{flag} {value} is for --target snapdragon only; the {target} target does not "
                               f"compile for a SoC: drop {flag} or use --target snapdragon")


def require_export_extras() -> None:
    """Refuse, before any work, when the export dependencies are not installed."""
    require("lit-export", EXPORT, "export")


def check_export_config(cfg: Any) -> None:
    """All checks of an ``ExportConfig``-like object (out, source, target, soc, hub_device, values)."""
    if cfg.out is None or not os.fspath(cfg.out).strip():
        raise LitedgeError("the output path is empty; give the bundle directory to write, e.g. out/model.litedge")
    check_values(cfg.text_max_length, cfg.steps, cfg.guidance_scale)
    check_target_options(cfg.target, cfg.soc, cfg.hub_device)
    check_paths(Path(cfg.out), Path(cfg.source) if cfg.source is not None else None)
