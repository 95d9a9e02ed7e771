"""ShapesEval of a demo bundle against guidance scale (and steps), on *tuning* prompts.

Tuning prompts are training captions in new layouts (``litedge.demo.shapes.tuning_prompts``):
sampling settings are chosen on them, never on the held-out evaluation prompts that the
demo's reported score uses.

    python bench/demo_guidance.py work/demo/bundles/student-fp32.litedge --prompts 200 --guidance 2,3,4.5,6
"""

from __future__ import annotations

import argparse
import time

from litedge.demo.shapes import tuning_prompts
from litedge.demo.shapes_eval import ShapesEval
from litedge.runtime import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--guidance", default="2,3,4.5,6", help="comma-separated guidance scales")
    ap.add_argument("--steps", default="20", help="comma-separated step counts")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="tuning prompts' seed; image seeds are 10000 + index")
    args = ap.parse_args()
    pipe = Pipeline.from_bundle(args.bundle, device="cpu")
    captions = [s.caption for s in tuning_prompts(args.prompts, args.seed)]
    judge = ShapesEval()
    print(f"{args.bundle}: {len(captions)} tuning prompts (training captions, new layouts), {args.size} px")
    print("| guidance | steps | overall | single | two | count | colours | position | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for steps in (int(s) for s in args.steps.split(",")):
        for g in (float(x) for x in args.guidance.split(",")):
            start = time.perf_counter()
            images = [pipe(c, height=args.size, width=args.size, steps=steps, guidance_scale=g, seed=10_000 + i,
                           progress=False)[0] for i, c in enumerate(captions)]
            r = judge.evaluate(images, captions)
            cats = " | ".join(f"{v:.2f}" for v in r["per_category"].values())
            print(f"| {g:g} | {steps} | **{r['overall']:.3f}** | {cats} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
