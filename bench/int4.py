"""int4 vs fp32 cpu bundles of one LiT student: transformer file size, step latency, output error.

A PixArt-Sigma-shaped teacher with random weights (``attention_scaling.make_teacher``:
patch 2, 4 latent channels, 4096 caption channels) is linearized into its LiT student
(2 heads), saved as a transformer directory, and exported twice with ``export_bundle``
(cpu target, ``weights="fp"`` and ``weights="int4"``, 120 prompt tokens). In one process:

- size: the transformer's ONNX files (graph + external data), MB and fp32/int4 ratio;
- latency: ``profile_bundle``'s transformer step (batch 2 = CFG, median over ``--repeat``
  after a warm-up), per size, both bundles measured back to back at each size;
- error: relative L2 error ``|int4 - fp32| / |fp32|`` and max abs error of the predicted
  noise on the same synthetic inputs (batch 2, timestep 500), per size.

ORT runs with ``--threads`` intra-op threads (default: the number of cores).

    python bench/int4.py                                  # width 576, 4 layers, 512,1024 px
    python bench/int4.py --width 1152 --layers 28 --sizes 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from attention_scaling import make_teacher  # noqa: E402

import litedge.runtime.session as runtime_session  # noqa: E402
from litedge.bundle import verify_bundle  # noqa: E402
from litedge.export.bundle_export import ExportConfig, export_bundle  # noqa: E402
from litedge.models.linearize import linearize  # noqa: E402
from litedge.models.student import save_transformer  # noqa: E402
from litedge.profile.inputs import synthetic_feed  # noqa: E402
from litedge.profile.measure import profile_bundle  # noqa: E402

TEXT_TOKENS = 120


def set_ort_threads(threads: int) -> None:
    """Make every runtime ComponentSession use ``threads`` intra-op threads (bench-local patch)."""
    make = runtime_session._session_options

    def options(device, low_memory):
        opts = make(device, low_memory)
        opts.intra_op_num_threads = threads
        # Idle ORT worker threads would otherwise spin and steal the cores from PyTorch runs
        # measured in the same process (bench/vs_diffusers.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    runtime_session._session_options = options


def build_bundles(work: Path, width: int, heads: int, layers: int) -> dict[str, Path]:
    """Save a random LiT student and export it to fp32 and int4 cpu bundles under ``work``."""
    torch.manual_seed(0)
    student, _ = linearize(make_teacher(width, heads, layers), "lit", heads=2, seed=0)
    save_transformer(student.eval(), work / "student", force=True)
    bundles = {}
    for weights in ("fp", "int4"):
        out = work / f"{weights}.litedge"
        export_bundle(ExportConfig(out=out, source=work / "student", target="cpu", weights=weights,
                                   text_max_length=TEXT_TOKENS, force=True))
        bundles["fp32" if weights == "fp" else "int4"] = out
    return bundles


def transformer_mb(bundle: Path) -> float:
    """Size of the transformer's graph plus its extra files (external data), MB."""
    comp = verify_bundle(bundle).components["transformer"]
    files = [comp.file, *(f["file"] for f in comp.extra_files)]
    return sum((bundle / f).stat().st_size for f in files) / 2**20


def output_error(bundles: dict[str, Path], pixels: int, threads: int) -> tuple[float, float, float]:
    """(rel L2 error, max abs error, fp32 output std) of int4 vs fp32 noise prediction at ``pixels``."""
    outs = []
    for bundle in (bundles["fp32"], bundles["int4"]):
        comp = verify_bundle(bundle).components["transformer"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(bundle / comp.file), opts, providers=["CPUExecutionProvider"])
        dims = {"batch": 2, "height": pixels // 8, "width": pixels // 8, "text_length": TEXT_TOKENS}
        outs.append(session.run(None, synthetic_feed(comp, dims, seed=1))[0][:, :4])  # noise half of learned sigma
        del session
    ref, q = outs
    return float(np.linalg.norm(q - ref) / np.linalg.norm(ref)), float(np.abs(q - ref).max()), float(ref.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--heads", type=int, default=8, help="teacher heads (the LiT student has 2)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, help="folder for the student and bundles (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_ort_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="litedge-int4-") as tmp:
        work = args.work or Path(tmp)
        bundles = build_bundles(work, args.width, args.heads, args.layers)
        profiles = {k: {} for k in bundles}
        for s in sizes:  # both bundles back to back at each size: same machine load
            for name, bundle in bundles.items():
                p = profile_bundle(bundle, [(s, s)], repeat=args.repeat, steps=1, device="cpu")
                profiles[name][s] = p.sizes[0].components["transformer_step"]
        errors = {s: output_error(bundles, s, args.threads) for s in sizes}
        mb = {k: transformer_mb(b) for k, b in bundles.items()}
        dev = p.device
        weights = verify_bundle(bundles["int4"]).target.get("weights")

    print(f"machine: {dev['cpu']}, {dev['cores']} cores, {args.threads} threads, onnxruntime {dev['onnxruntime']}, "
          f"torch {torch.__version__}")
    print(f"model: LiT student of a PixArt-Sigma-shaped teacher, width {args.width}, {args.layers} layers, "
          f"2 linear heads, caption 4096; batch 2 (CFG), {TEXT_TOKENS} text tokens; int4 = {weights}\n")
    print(f"transformer file: fp32 {mb['fp32']:.1f} MB, int4 {mb['int4']:.1f} MB, ratio {mb['fp32'] / mb['int4']:.2f}x\n")
    header = (f"{'px':>5} {'tokens':>6} | {'fp32 ms':>9} {'int4 ms':>9} {'fp32/int4':>9} | "
              f"{'rel err':>8} {'max abs':>8} {'out std':>8}")
    print(header)
    print("-" * len(header))
    for s in sizes:
        fp, q = profiles["fp32"][s].median, profiles["int4"][s].median
        rel, mx, std = errors[s]
        print(f"{s:>5} {(s // 16) ** 2:>6} | {fp * 1e3:>9.1f} {q * 1e3:>9.1f} {fp / q:>8.2f}x | "
              f"{rel:>8.2e} {mx:>8.2e} {std:>8.3f}")
    print(f"\nmedian of {args.repeat} step(s) after a warm-up; error on noise_pred (first 4 channels), "
          "same synthetic inputs")


if __name__ == "__main__":
    main()
