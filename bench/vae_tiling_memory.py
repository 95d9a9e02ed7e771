"""Peak memory of a 2048x2048 generation with tiled vs untiled VAE decoding.

Each run is a fresh worker process under a fresh wrapper process; the wrapper reads
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (its only child is the worker), so
one run's peak cannot leak into the other's. A third run stops before the VAE to show
the baseline (weights, latents, the transformer's activations). Linux: ru_maxrss in KiB.

    python bench/vae_tiling_memory.py                     # tiny LiT bundle, 2048 px
    python bench/vae_tiling_memory.py --bundle X.litedge --size 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import sys, time, numpy as np
from litedge.runtime import Pipeline
bundle, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipe = Pipeline.from_bundle(bundle, device="cpu")
pipe.vae_tile = 0 if mode == "untiled" else 64
start = time.perf_counter()
if mode == "no-decode":
    pipe.decode = lambda latents: np.zeros((latents.shape[0], 3, 8, 8), np.float32)
pipe("a cat on the snow", height=size, width=size, steps=2, progress=False)
print(time.perf_counter() - start)
"""

WRAPPER = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(done.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(bundle: Path, size: int, mode: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one generation in a fresh process."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, WORKER, str(bundle), str(size), mode],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to run (default: build the tiny LiT one)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "litedge-bench")
    args = parser.parse_args()
    if args.bundle is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from _bundles import tiny_lit_bundle

        args.bundle = tiny_lit_bundle(args.cache)
    results = {mode: measure(args.bundle, args.size, mode) for mode in ("no-decode", "tiled", "untiled")}
    print(f"{args.size}x{args.size}, 2 steps, bundle {args.bundle.name}")
    for mode, (seconds, mib) in results.items():
        print(f"  {mode:10s} peak RSS {mib:8.0f} MiB   {seconds:6.1f} s")
    base = results["no-decode"][1]
    tiled, untiled = results["tiled"][1] - base, results["untiled"][1] - base
    print(f"  VAE decode above baseline: tiled {tiled:.0f} MiB, untiled {untiled:.0f} MiB "
          f"(untiled / tiled = {untiled / max(tiled, 1):.1f}x)")
    print(json.dumps({m: {"seconds": round(s, 2), "peak_rss_mib": round(r)} for m, (s, r) in results.items()}))


if __name__ == "__main__":
    main()
