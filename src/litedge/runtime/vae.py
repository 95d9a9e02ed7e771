"""Latent -> image with the bundle's VAE decoder, tiled when the latent is large.

A VAE decoder's activations grow with the image (an SDXL-class VAE needs ~16 GB at 2048 px
untiled, docs/design.md). Latents larger than ``tile`` on a side are cut into ``tile`` x ``tile``
tiles that overlap by ``overlap`` latent pixels; each is decoded alone and the overlaps
are cross-faded with linear ramps, so peak memory is that of one tile. Below ``tile`` the
latent is decoded in one run, exactly.

The decoder graph (``litedge.export``) undoes the latent scaling itself and returns images
in [-1, 1]::

    image = decode_latents(lambda z: session.run(latent=z), latents, scale_factor=8)
"""

from __future__ import annotations

from collections.abc import Callable

import math

import numpy as np

TILE = 64  # latent pixels (512 px with an 8x VAE)
OVERLAP = 16


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the fewest tiles of at most ``tile`` covering [0, size), neighbours
    overlapping by at least ``overlap``, spread evenly."""
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)  # <= tile
    return [(round(i * (size - length) / (n - 1)), length) for i in range(n)]


def _ramp(length: int, fade_in: int, fade_out: int) -> np.ndarray:
    """(length,) weights: rising over ``fade_in`` samples, 1 in the middle, falling over ``fade_out``."""
    w = np.ones(length, dtype=np.float32)
    if fade_in:
        w[:fade_in] = (np.arange(fade_in, dtype=np.float32) + 0.5) / fade_in
    if fade_out:
        w[length - fade_out:] = np.minimum(w[length - fade_out:], (np.arange(fade_out, 0, -1, dtype=np.float32) - 0.5) / fade_out)
    return w


def decode_latents(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, scale_factor: int,
                   tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """Decode (B, C, h, w) latents to (B, 3, h*f, w*f) float32 images in [-1, 1], f = ``scale_factor``.

    ``decode`` runs the VAE decoder on one (B, C, th, tw) latent. ``tile <= 0`` never tiles.
    """
    B, _, h, w = latents.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return decode(latents)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    f = scale_factor
    rows, cols = _spans(h, tile, overlap), _spans(w, tile, overlap)
    out = np.zeros((B, 3, h * f, w * f), dtype=np.float32)
    weight = np.zeros((h * f, w * f), dtype=np.float32)
    for r, (y, th) in enumerate(rows):
        for c, (x, tw) in enumerate(cols):
            piece = decode(latents[:, :, y:y + th, x:x + tw])  # (B, 3, th*f, tw*f)
            # cross-fade only over the part this tile shares with its neighbours
            up = (sum(rows[r - 1]) - y) * f if r > 0 else 0
            down = (y + th - rows[r + 1][0]) * f if r + 1 < len(rows) else 0
            left = (sum(cols[c - 1]) - x) * f if c > 0 else 0
            right = (x + tw - cols[c + 1][0]) * f if c + 1 < len(cols) else 0
            mask = np.outer(_ramp(th * f, up, down), _ramp(tw * f, left, right))  # (th*f, tw*f)
            out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += piece * mask
            weight[y * f:(y + th) * f, x * f:(x + tw) * f] += mask
    return out / weight
