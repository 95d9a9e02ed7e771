"""Transformer forward latency: softmax teacher vs LiT vs EDiT students, 512 to 4096 px.

All three models share the teacher's width and every non-attention weight (they are made
with ``linearize``); they run side by side in one process, so the ratios are measured
under the same machine load. Depth is reduced (``--layers``, default 1) to keep the 4K
softmax run affordable on a 2-core CPU: per-block cost is what scales with resolution.

Achieved GFLOP/s (counted with ``torch.utils.flop_counter``) is quoted as a fraction of
the machine's fp32 matmul rate measured in the same run (``torch.mm``, 4096^3).

    python bench/attention_scaling.py                 # 512,1024,2048,4096 px
    python bench/attention_scaling.py --sizes 512,1024 --width 1152 --heads 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from litedge.models.linearize import linearize


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_teacher(width: int, heads: int, layers: int) -> PixArtTransformer2DModel:
    """A PixArt-Sigma-shaped teacher (patch 2, 4 latent channels, T5-sized captions)."""
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=8,
        num_layers=layers, cross_attention_dim=width, caption_channels=4096, sample_size=128, patch_size=2,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        interpolation_scale=2, use_additional_conditions=False,
    ).eval()


def forward_fn(model, pixels: int, text_tokens: int = 120):
    latent = pixels // 8
    x = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, text_tokens, 4096)
    t = torch.tensor([500])
    cond = {"resolution": None, "aspect_ratio": None}
    return lambda: model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="median over repeats (1 for runs over 20 s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = make_teacher(args.width, args.heads, args.layers)
    models = {
        "softmax": teacher,
        "LiT": linearize(teacher, "lit", heads=2, seed=0)[0].eval(),
        "EDiT": linearize(teacher, "edit", heads=args.heads, seed=0)[0].eval(),
    }
    peak = matmul_peak_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"fp32 matmul rate (torch.mm 4096^3): {peak:.0f} GFLOP/s")
    print(f"models: PixArt-Sigma-shaped, width {args.width}, {args.heads} heads (LiT 2), {args.layers} block(s), "
          "120 prompt tokens, batch 1\n")
    header = f"{'px':>5} {'tokens':>7} | " + " | ".join(f"{n:>8} s  GF/s %peak" for n in models) + " | LiT x  EDiT x"
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for pixels in (int(s) for s in args.sizes.split(",")):
            row, seconds = [], {}
            for name, model in models.items():
                fn = forward_fn(model, pixels)
                with FlopCounterMode(display=False) as counter:
                    first = _time(fn)  # also the warm-up
                flops = counter.get_total_flops()
                seconds[name] = first if first > 20 else statistics.median(_time(fn) for _ in range(args.repeats))
                gflops = flops / seconds[name] / 1e9
                row.append(f"{seconds[name]:>10.3f} {gflops:>5.0f} {100 * gflops / peak:>4.0f}%")
            tokens = (pixels // 16) ** 2
            ratios = f"{seconds['softmax'] / seconds['LiT']:>5.1f}x {seconds['softmax'] / seconds['EDiT']:>6.1f}x"
            print(f"{pixels:>5} {tokens:>7} | " + " | ".join(row) + f" | {ratios}", flush=True)


if __name__ == "__main__":
    main()
