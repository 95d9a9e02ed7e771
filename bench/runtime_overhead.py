"""The runtime's per-step overhead: everything in the denoising loop except ``session.run``.

The loop's wall time per step is measured around ``Pipeline.denoise``; the transformer's
``session.run`` time is summed inside the loop by :class:`ComponentSession` (``run_seconds``).
The rest — input checks, batching for guidance, the guidance mix, learned-sigma split,
the scheduler step, the progress bar — is the overhead, printed in ms and as a fraction
of the step. With the tiny test model the step is short, so the fraction is an upper bound;
the absolute ms is what carries over to real models.

    python bench/runtime_overhead.py
    python bench/runtime_overhead.py --bundle X.litedge --sizes 512,1024 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


from litedge.runtime import Pipeline


def measure(pipe: Pipeline, size: int, steps: int, progress: bool) -> tuple[float, float]:
    """(wall ms per step, session.run ms per step) of one CFG denoising loop at ``size`` px."""
    req = pipe._request("a cat on the snow", "", size, size, steps, 4.5, 0, 1, None, None, False)
    cond = pipe._conditioning(req)
    transformer = pipe._session("transformer")
    scheduler = pipe._scheduler(req.scheduler)
    scheduler.set_timesteps(1)
    pipe.denoise(pipe.initial_latents(req), cond, scheduler, req.guidance_scale, progress=False)  # warm-up
    scheduler.set_timesteps(steps)
    before = transformer.run_seconds
    start = time.perf_counter()
    pipe.denoise(pipe.initial_latents(req), cond, scheduler, req.guidance_scale, progress=progress)
    wall = time.perf_counter() - start
    return wall / steps * 1e3, (transformer.run_seconds - before) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to run (default: build the tiny LiT one)")
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "litedge-bench")
    args = parser.parse_args()
    if args.bundle is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from _bundles import tiny_lit_bundle

        args.bundle = tiny_lit_bundle(args.cache)
    pipe = Pipeline.from_bundle(args.bundle, device="cpu")
    print(f"bundle {args.bundle.name}, {args.steps} steps, CFG (batch 2 per step)")
    print(f"{'size':>6} {'progress':>8} {'step ms':>9} {'run ms':>9} {'overhead ms':>12} {'overhead %':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        for progress in (False, True):
            step, run = measure(pipe, size, args.steps, progress)
            print(f"{size:>6} {str(progress):>8} {step:9.2f} {run:9.2f} {step - run:12.3f} {100 * (step - run) / step:10.2f}%")


if __name__ == "__main__":
    main()
