"""End-to-end generation: litedge's torch-free Pipeline vs diffusers' PixArtSigmaPipeline (CPU).

One random-weight pipeline directory is built (the runtime tests' tiny VAE, tiny T5 and
tokenizer and scheduler from ``tests/runtime/fixtures.py``, with a moderate LiT student
in place of the tiny transformer: a PixArt-Sigma-shaped teacher of ``--width`` and
``--layers`` linearized to 2 heads) and exported to fp32 and int4 cpu bundles. Then, per
size, the same prompt, steps, guidance (CFG, batch 2 per step), scheduler (DPM-Solver++ 2M)
and initial latents go through:

- diffusers: ``PixArtSigmaPipeline``, PyTorch fp32 on CPU, ``torch.no_grad``;
- litedge fp32 / int4: ``litedge.runtime.Pipeline`` on onnxruntime's CPU EP.

Each is warmed up once per size, then timed ``--repeat`` times in interleaved rounds (same
machine load); seconds are medians, including text encoding, the loop and the VAE decode.
torch and ORT use the same number of intra-op threads (``--threads``). The mean |pixel
difference| vs diffusers (in 1/255) checks that both ran the same computation.

    python bench/vs_diffusers.py                              # 256,512 px, 20 steps, 2 threads
    python bench/vs_diffusers.py --sizes 256,512 --steps 10 --repeat 3
    python bench/vs_diffusers.py --width 576 --layers 8 --sizes 1024 --steps 20 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from int4 import set_ort_threads  # noqa: E402

from litedge.bundle import verify_bundle  # noqa: E402
from litedge.models.configs import _pixart_sigma  # noqa: E402
from litedge.models.linearize import linearize  # noqa: E402
from litedge.models.student import save_transformer  # noqa: E402
from litedge.profile.measure import device_info  # noqa: E402
from litedge.runtime import Pipeline  # noqa: E402
from litedge.runtime.devices import resolve_device  # noqa: E402
from tests.runtime.fixtures import TEXT_MAX_LENGTH, diffusers_pipeline, export, make_tiny_pixart_pipeline  # noqa: E402

PROMPT = "a red fox in the snow"
T5_WIDTH = 32  # the fixture's tiny T5 d_model = the transformer's caption_channels


def build_pipeline_dir(out: Path, width: int, heads: int, layers: int) -> Path:
    """The fixture's tiny pipeline with its transformer replaced by a ``width`` x ``layers`` LiT student."""
    from diffusers import PixArtTransformer2DModel

    make_tiny_pixart_pipeline(out, linear=True, mid_attention=False)
    torch.manual_seed(0)
    teacher = PixArtTransformer2DModel.from_config(_pixart_sigma(layers, heads, width // heads, T5_WIDTH, 64))
    student, _ = linearize(teacher.eval(), "lit", heads=2, seed=0)
    save_transformer(student.eval(), out / "transformer", force=True)
    return out


def run_diffusers(pipe, size: int, steps: int, guidance: float, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.from_numpy(latents), clean_caption=False, use_resolution_binning=False,
                    max_sequence_length=TEXT_MAX_LENGTH, output_type="np").images  # (1, H, W, 3) in [0, 1]


def run_litedge(pipe: Pipeline, size: int, steps: int, guidance: float, latents: np.ndarray) -> np.ndarray:
    images = pipe(PROMPT, height=size, width=size, steps=steps, guidance_scale=guidance, latents=latents,
                  progress=False)
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6, help="teacher heads (the LiT student has 2)")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_ort_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="litedge-vs-diffusers-") as tmp:
        src = build_pipeline_dir(Path(tmp) / "pipeline", args.width, args.heads, args.layers)
        bundles = {"fp32": export(src, Path(tmp) / "fp.litedge"), "int4": export(src, Path(tmp) / "int4.litedge", "int4")}
        reference = diffusers_pipeline(src)
        reference.set_progress_bar_config(disable=True)
        runners = {"diffusers": lambda s, l, p=reference: run_diffusers(p, s, args.steps, args.guidance, l)}
        for name, bundle in bundles.items():
            pipe = Pipeline.from_bundle(bundle, device="cpu")
            runners[f"litedge {name}"] = lambda s, l, p=pipe: run_litedge(p, s, args.steps, args.guidance, l)
        manifest = verify_bundle(bundles["int4"])
        dev = device_info(resolve_device("cpu", manifest.target), manifest)

        results = {}
        for size in (int(s) for s in args.sizes.split(",")):
            latents = np.random.default_rng(7).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
            images = {name: run(size, latents) for name, run in runners.items()}  # warm-up, and the images
            seconds = {name: [] for name in runners}
            for _ in range(args.repeat):
                for name, run in runners.items():
                    seconds[name].append(timed(lambda: run(size, latents))[0])
            results[size] = ({k: statistics.median(v) for k, v in seconds.items()}, images)

    print(f"machine: {dev['cpu']}, {dev['cores']} cores; {args.threads} threads for torch and ORT; "
          f"torch {torch.__version__}, onnxruntime {dev['onnxruntime']}")
    print(f"model: LiT student (PixArt-Sigma-shaped, width {args.width}, {args.layers} layers, 2 linear heads), "
          f"tiny T5 ({TEXT_MAX_LENGTH} tokens), tiny 8x VAE; {args.steps} steps DPM-Solver++, guidance "
          f"{args.guidance} (batch 2 per step), 1 image; int4 = {manifest.target.get('weights')}")
    print(f"seconds: median of {args.repeat} after a warm-up; x = diffusers s / litedge s; "
          "|diff| = mean |pixel - diffusers pixel| in 1/255, same initial latents\n")
    header = (f"{'px':>5} | {'diffusers s':>11} | {'litedge fp32 s':>14} {'x':>6} {'|diff|':>7} | "
              f"{'litedge int4 s':>14} {'x':>6} {'|diff|':>7} | {'image std':>9}")
    print(header)
    print("-" * len(header))
    for size, (sec, images) in results.items():
        ref = images["diffusers"]
        cells = []
        for name in ("litedge fp32", "litedge int4"):
            diff = np.abs(images[name] - ref).mean() * 255
            cells.append(f"{sec[name]:>14.3f} {sec['diffusers'] / sec[name]:>5.2f}x {diff:>7.3f}")
        print(f"{size:>5} | {sec['diffusers']:>11.3f} | " + " | ".join(cells) + f" | {ref.std():>9.3f}")


if __name__ == "__main__":
    main()
