"""Latent -> image with the bundle's VAE decoder, tiled when the latent is large.

A VAE decoder's activations grow with the image (an SDXL-class VAE needs ~16 GB at 2048 px
untiled, docs/design.md). Latents larger than ``tile`` on a side are cut into ``tile`` x ``tile``
tiles that overlap by at least ``overlap`` latent pixels; each is decoded alone. Below ``tile``
the latent is decoded in one run, exactly.

Blending: a tile's pixels near its own border are the wrong ones (the decoder's convolutions
see zero padding there instead of the neighbour's latent), so in each shared overlap the outer
quarter on either side is dropped and the tiles are cross-faded with a linear ramp over the
middle half. A decoder whose receptive field reaches less than a quarter of the overlap
(plus half the fade) therefore comes out exactly as untiled; GroupNorm or attention over a
tile (AutoencoderKL) still leaves small differences, as in diffusers' tiled VAE.

Tile sizes are latent pixels, so their size in pixels scales with the VAE factor ``f``
(:func:`default_tiling`): up to f8, 64-latent tiles overlapping by 16 (512 px tiles at f8).
From f16 (deep-compression autoencoders; SANA's DC-AE is f32) the overlap is 16 latents (512
px at f32: one latent pixel spans 32 px of the decoder's context) and a tile holds as many
pixels as fit :data:`DEEP_TILE_BUDGET` channel-pixels at the decoder's full-resolution width
(manifest meta ``decoder_channels[0]``), at least 32 latents: SANA's 128 channels -> 1024 px
tiles; the demo's 16 channels -> 90 latents, so 2048 px decodes in one pass (tiled it took
2.5x as long, 26.6 s vs 10.8 s, to save 0.45 GB of its 1.13 GB peak). On a ResBlock-only f32
DC-AE (tests/runtime/test_dc_vae_tiling.py) 32-latent tiles match untiled to < 1/255.

The decoder graph (``litedge.export``) undoes the latent scaling itself and returns images
in [-1, 1]::

    tile, overlap = default_tiling(32)
    image = decode_latents(lambda z: session.run(latent=z), latents, 32, tile, overlap)
"""

from __future__ import annotations

from collections.abc import Callable

import math

import numpy as np

TILE = 64  # latent pixels (512 px with an 8x VAE)
OVERLAP = 16
DEEP_TILE = 32  # latent pixels for VAE factors >= 16, at least (1024 px with a 32x DC-AE)
DEEP_OVERLAP = 16
DEEP_TILE_BUDGET = 128 * 1024**2  # channel-pixels of one tile at full resolution: 128 channels x 1024^2 px


def default_tiling(scale_factor: int, decoder_channels=None) -> tuple[int, int]:
    """(tile, overlap) in latent pixels for a VAE of ``scale_factor`` image px per latent px.

    ``decoder_channels``: the decoder's channels per stage, full resolution first (the
    vae_decoder meta's); from f16 a narrow decoder gets larger tiles (see the module doc).
    """
    if scale_factor <= 8:
        return TILE, OVERLAP
    width = decoder_channels[0] if isinstance(decoder_channels, (list, tuple)) and decoder_channels else None
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        return DEEP_TILE, DEEP_OVERLAP
    return max(DEEP_TILE, int(math.sqrt(DEEP_TILE_BUDGET / width)) // scale_factor), DEEP_OVERLAP


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the fewest tiles of at most ``tile`` covering [0, size), neighbours
    overlapping by at least ``overlap``, spread evenly."""
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)  # <= tile
    return [(round(i * (size - length) / (n - 1)), length) for i in range(n)]


def _fade(n: int) -> np.ndarray:
    """(n,) rising weights over a shared overlap of ``n`` samples: 0 over its first quarter,
    a linear ramp over the middle half, 1 over the last quarter. ``_fade(n)`` of the tile that
    starts there plus ``_fade(n)[::-1]`` of the tile that ends there is 1 everywhere."""
    trim = n // 4
    band = n - 2 * trim
    w = np.zeros(n, dtype=np.float32)
    w[trim:trim + band] = (np.arange(band, dtype=np.float32) + 0.5) / band
    w[trim + band:] = 1.0
    return w


def _ramp(length: int, fade_in: int, fade_out: int) -> np.ndarray:
    """(length,) weights of one tile: :func:`_fade` over the ``fade_in`` samples it shares with the
    previous tile, 1 in the middle, the mirrored fade over the ``fade_out`` it shares with the next."""
    w = np.ones(length, dtype=np.float32)
    if fade_in:
        w[:fade_in] = _fade(fade_in)
    if fade_out:
        w[length - fade_out:] = np.minimum(w[length - fade_out:], _fade(fade_out)[::-1])
    return w


def decode_latents(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, scale_factor: int,
                   tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """Decode (B, C, h, w) latents to (B, 3, h*f, w*f) float32 images in [-1, 1], f = ``scale_factor``.

    ``decode`` runs the VAE decoder on one (B, C, th, tw) latent. ``tile`` and ``overlap`` are
    latent pixels (:func:`default_tiling` gives the defaults per factor); ``tile <= 0`` never tiles.
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
