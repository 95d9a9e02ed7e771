"""Tiny teachers and datasets for the distillation tests (and anyone else who needs them).

- :func:`make_tiny_pixart_pipeline`: a diffusers-style PixArt-Sigma pipeline directory
  (transformer/ via ``save_transformer``, vae/, text_encoder/, tokenizer/, scheduler/ with
  PixArt-Sigma's DPM-Solver++ config, model_index.json). It is the runtime tests' builder,
  imported, not copied.
- :func:`make_shapes_dataset`: coloured squares and circles drawn with PIL, each image with a
  same-stem ``.txt`` caption (``"a red circle"``), or as class folders.
- :func:`make_tiny_dit_pipeline`: a class-conditional DiT teacher with a VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.runtime.fixtures import make_tiny_pixart_pipeline, tiny_vae

__all__ = ["draw_shape", "make_shapes_dataset", "make_tiny_dit_pipeline", "make_tiny_pixart_pipeline", "tiny_vae"]

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def draw_shape(shape: str, colour: str, size: int, offset: int):
    """A PIL image: one filled shape on a grey background, shifted by ``offset`` pixels."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    lo, hi = size // 4 + offset, 3 * size // 4 + offset
    (draw.rectangle if shape == "square" else draw.ellipse)([lo, lo, hi, hi], fill=COLOURS[colour])
    return im


def make_shapes_dataset(out: Path, count: int = 16, size: int = 64, *, classes: bool = False) -> Path:
    """Write ``count`` shape images (PNG) with captions, or class folders ``out/<class id>/``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    for i in range(count):
        shape, colour = combos[i % len(combos)]
        im = draw_shape(shape, colour, size, offset=(i // len(combos)) % 5 - 2)
        if classes:
            folder = out / str(combos.index((shape, colour)))
            folder.mkdir(exist_ok=True)
            im.save(folder / f"{i:04d}.png")
        else:
            im.save(out / f"{i:04d}.png")
            (out / f"{i:04d}.txt").write_text(f"a {colour} {shape}")
    return out


def make_tiny_dit_pipeline(out: Path) -> Path:
    """A tiny class-conditional DiT pipeline directory (transformer/, vae/, model_index.json)."""
    import torch

    from litedge.models.configs import build_model
    from litedge.models.student import save_transformer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("tiny-LiT-S/2", teacher=True, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_transformer(model, out / "transformer")
    tiny_vae().save_pretrained(out / "vae")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return out
