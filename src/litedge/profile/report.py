"""lit-profile output: a table for people, JSON and CSV for tools (torch-free).

Several bundles profiled on the same device are compared side by side: every bundle after
the first gets ratio columns (first bundle's time / this bundle's time, so > 1 is faster).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from litedge.errors import LitedgeError
from litedge.extras import PLOT, require
from litedge.profile.measure import BundleProfile
from litedge.safe_write import check_target, write_text

COMPONENTS = ("transformer_step", "vae_decode", "text_encoder")


def rows(profiles: list[BundleProfile]) -> list[dict]:
    """One flat row per (bundle, size): medians/min/max in ms, end-to-end s, peak RSS, speedup vs the first."""
    reference = {(s.height, s.width): s for s in profiles[0].sizes} if profiles else {}
    out = []
    for profile in profiles:
        for size in profile.sizes:
            row = {"bundle": profile.bundle, "family": profile.family, "height": size.height, "width": size.width}
            for name in COMPONENTS:
                timing = size.components.get(name)
                for stat in ("median", "min", "max"):
                    row[f"{name}_{stat}_ms"] = round(getattr(timing, stat) * 1e3, 3) if timing else None
            row["end_to_end_s"] = round(size.end_to_end, 4)
            row["steps"] = profile.steps
            row["peak_rss_mb"] = round(size.peak_rss_mb, 1)
            ref = reference.get((size.height, size.width))
            ref_step = ref.components.get("transformer_step") if ref else None
            row["step_speedup_vs_first"] = (
                round(ref_step.median / size.components["transformer_step"].median, 2) if ref_step else None
            )
            row["end_to_end_speedup_vs_first"] = round(ref.end_to_end / size.end_to_end, 2) if ref else None
            if size.op_groups:
                total = sum(size.op_groups.values())
                for group, seconds in sorted(size.op_groups.items()):
                    row[f"ops_{group}_share"] = round(seconds / total, 4)
            out.append(row)
    return out


def to_json(profiles: list[BundleProfile]) -> str:
    return json.dumps({"profiles": [p.to_json() for p in profiles], "rows": rows(profiles)}, indent=2)


def to_csv(profiles: list[BundleProfile]) -> str:
    table = rows(profiles)
    fields = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def to_table(profiles: list[BundleProfile]) -> str:
    """A fixed-width table; the header names the device it was measured on."""
    if not profiles:
        return ""
    dev = profiles[0].device
    lines = [
        f"device: {dev['cpu']} ({dev['cores']} cores), {dev['provider']}"
        + (" [QNN HTP simulator on x86: not phone time]" if dev.get("simulator") else "")
        + f", onnxruntime {dev['onnxruntime']}",
        f"times: median over repeats (min-max) in ms; end-to-end = text + {profiles[0].steps} steps x step + VAE; "
        f"batch {profiles[0].batch} per step",
        "",
    ]
    header = f"{'bundle':<24} {'family':<7} {'precision':<18} {'size':>9} {'step ms':>22} {'vae ms':>9} {'text ms':>8} " \
             f"{'e2e s':>8} {'RSS MB':>7} {'step x':>6} {'e2e x':>6}"
    lines += [header, "-" * len(header)]
    table = iter(rows(profiles))
    for profile, row in ((p, next(table)) for p in profiles for _ in p.sizes):
        precision = f"{profile.device['precision']}/{profile.device['weights']}"
        step = f"{_ms(row['transformer_step_median_ms'])} ({_ms(row['transformer_step_min_ms'])}-{_ms(row['transformer_step_max_ms'])})"
        ratio = "" if profile is profiles[0] else f"{row['step_speedup_vs_first']:>6.2f} {row['end_to_end_speedup_vs_first']:>6.2f}"
        lines.append(
            f"{row['bundle'][:24]:<24} {row['family']:<7} {precision[:18]:<18} {row['height']:>4}x{row['width']:<4} "
            f"{step:>22} {_ms(row['vae_decode_median_ms']):>9} {_ms(row['text_encoder_median_ms']):>8} "
            f"{row['end_to_end_s']:>8.3f} {row['peak_rss_mb']:>7.0f} {ratio}"
        )
    shares = [(p.bundle, s) for p in profiles for s in p.sizes if s.op_groups]
    if shares:
        groups = sorted({g for _, s in shares for g in s.op_groups})
        lines += ["", "transformer time by operator group (share of kernel time):",
                  f"{'bundle':<24} {'size':>9} " + " ".join(f"{g[:15]:>15}" for g in groups)]
        for name, size in shares:
            total = sum(size.op_groups.values())
            cells = " ".join(f"{100 * size.op_groups.get(g, 0) / total:>14.1f}%" for g in groups)
            lines.append(f"{name[:24]:<24} {size.height:>4}x{size.width:<4} {cells}")
    return "\n".join(lines)


def check_outputs(json_out: str | os.PathLike | None, csv_out: str | os.PathLike | None,
                  plot: str | os.PathLike | None) -> None:
    """Refuse, before anything is measured, report paths that cannot be written (a device, a
    folder, a symlink, a missing folder), two reports aimed at one file, and --plot without matplotlib."""
    given = [(flag, p) for flag, p in (("--json", json_out), ("--csv", csv_out), ("--plot", plot)) if p is not None]
    seen: dict[str, str] = {}
    for flag, path in given:
        if not os.fspath(path).strip():
            raise LitedgeError(f"{flag} is empty; give a file path such as report.{flag[2:].replace('plot', 'png')}")
        real = os.path.realpath(path)
        if real in seen:
            raise LitedgeError(f"{flag} and {seen[real]} both write {path}; give each report its own file")
        seen[real] = flag
        check_target(path, f"{flag} report")
    if plot is not None:
        require("--plot", PLOT, "distill", install="pip install matplotlib (or litedge[distill])")


def write_report(path: str | os.PathLike, text: str) -> Path:
    """Write a report file safely (:func:`litedge.safe_write.write_text`): all or nothing, never through a link."""
    return write_text(path, text, what="report")
