"""The steps of bench/gpu_check.sh (export for cuda, CUDA EP vs CPU EP parity, step times).

    python bench/_gpu_check.py export WORK [--dry-run]
    python bench/_gpu_check.py check WORK [--dry-run]

``export`` writes cuda-target bundles under WORK: tiny student (and, unless ``--dry-run``,
the 4-layer XL-width student and its softmax teacher, fp16 weights). ``check`` runs every
bundle's transformer on the CUDA EP through the runtime's ComponentSession (IO binding on)
and on the CPU EP, prints their relative difference (fails past :data:`PARITY`), then step
times of student vs teacher at 1024 and 2048 px. ``--dry-run`` does the same on the CPU EP
with the tiny bundles only, at 64 and 128 px, so the script can be tested without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

PARITY = 0.05  # fp16 on CUDA vs the same graph on the CPU EP (which computes most fp16 ops in fp32)


def _pairs(dry_run: bool) -> dict[str, tuple[str, int, bool]]:
    """label -> (config name, layers, teacher)."""
    pairs = {"tiny student": ("tiny-LiT-T2I-XL", 2, False), "tiny teacher": ("tiny-LiT-T2I-XL", 2, True)}
    if not dry_run:
        pairs.update({"XL 4L student": ("", 4, False), "XL 4L teacher": ("", 4, True)})
    return pairs


def _bundles(work: Path, dry_run: bool) -> dict[str, Path]:
    """Export (once) each cuda bundle, transformer only (bench/xl_speed.py's sources)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from xl_speed import bundle  # noqa: E402

    out = {}
    for label, (name, layers, teacher) in _pairs(dry_run).items():
        start = time.perf_counter()
        out[label] = bundle(work, layers, "fp", teacher, target="cuda", name=name or None)
        print(f"exported {label} for cuda ({time.perf_counter() - start:.0f} s): {out[label].name}", flush=True)
    return out


def export(work: Path, dry_run: bool) -> None:
    _bundles(work, dry_run)


def check(work: Path, dry_run: bool) -> int:
    import onnxruntime as ort

    from litedge.bundle import verify_bundle
    from litedge.profile.inputs import synthetic_feed
    from litedge.profile.measure import profile_bundle
    from litedge.runtime.devices import DEVICES, is_available
    from litedge.runtime.session import ComponentSession

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not is_available("cuda"):
        print(f"no CUDA EP: onnxruntime has {ort.get_available_providers()}; install onnxruntime-gpu", flush=True)
        return 1
    failed = 0
    bundles = _bundles(work, dry_run)
    for label, path in bundles.items():
        manifest = verify_bundle(path)
        comp = manifest.components["transformer"]
        latent = 16 if dry_run else 64
        feed = synthetic_feed(comp, {"batch": 2, "height": latent, "width": latent, "text_length": 16})
        gpu = ComponentSession.open(path, "transformer", comp, DEVICES[device])
        cpu = ComponentSession.open(path, "transformer", comp, DEVICES["cpu"], io_binding=False)
        got, ref = gpu.run(**feed), cpu.run(**feed)
        rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        ok = np.isfinite(got).all() and rel <= PARITY
        failed += not ok
        print(f"parity {label}: {device} EP (io_binding {gpu.io_binding}) vs CPU EP rel err {rel:.2e} "
              f"({'ok' if ok else 'FAILED'}, limit {PARITY})", flush=True)
        gpu.close()
        cpu.close()
    sizes = [(64, 64), (128, 128)] if dry_run else [(1024, 1024), (2048, 2048)]
    pairs = [("tiny student", "tiny teacher")] + ([] if dry_run else [("XL 4L student", "XL 4L teacher")])
    for student, teacher in pairs:
        for size in sizes:
            times = {}
            for label in (student, teacher):
                prof = profile_bundle(bundles[label], [size], repeat=3, steps=1, device=device).sizes[0]
                times[label] = prof.components["transformer_step"].median
            print(f"step {size[0]} px on {device}: {student} {times[student] * 1e3:.1f} ms, {teacher} "
                  f"{times[teacher] * 1e3:.1f} ms, teacher / student {times[teacher] / times[student]:.2f}", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=("export", "check"))
    parser.add_argument("work", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "export":
        export(args.work, args.dry_run)
        return 0
    return check(args.work, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
