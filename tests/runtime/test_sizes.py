"""Large and non-square sizes with a linear-attention student; tiled VAE decoding."""

import time

import numpy as np
import pytest

from litedge.runtime import Pipeline
from litedge.runtime.vae import _spans, decode_latents


@pytest.mark.parametrize("height, width", [(1024, 1024), (2048, 2048), (512, 1536)])
def test_generates_at_large_and_non_square_sizes(lit_bundle, height, width):
    pipe = Pipeline.from_bundle(lit_bundle, device="cpu")
    start = time.perf_counter()
    image = pipe("a cat on the snow", height=height, width=width, steps=2, progress=False)[0]
    print(f"{height}x{width}: {time.perf_counter() - start:.1f} s (2 steps, CFG)")
    pixels = np.asarray(image)
    assert image.size == (width, height) and pixels.std() > 5  # (W, H) in PIL


def test_tiled_decoding_is_close_to_untiled(lit_bundle):
    pipe = Pipeline.from_bundle(lit_bundle, device="cpu")
    latents = np.random.default_rng(1).standard_normal((1, 4, 128, 96), dtype=np.float32)  # 1024 x 768 px
    tiled = pipe.decode(latents)
    pipe.vae_tile = 0
    untiled = pipe.decode(latents)
    diff = np.abs(tiled - untiled) / 2  # in [0, 1] image units
    print(f"tiled vs untiled decode (1024x768, 64-latent tiles, overlap 16): max |diff| {diff.max() * 255:.1f}/255, "
          f"mean {diff.mean() * 255:.2f}/255")
    assert tiled.shape == untiled.shape == (1, 3, 1024, 768)
    # GroupNorm statistics are per tile: small differences remain, as in diffusers' tiled VAE
    assert diff.mean() < 2 / 255 and diff.max() < 0.25


def test_blending_is_exact_for_a_pointwise_decoder():
    """A decoder without spatial context must come out the same tiled or not: the weights sum to 1."""
    def decode(z):  # (B, C, h, w) -> (B, 3, 8h, 8w), nearest upsampling of a pointwise map
        return np.tanh(z[:, :3]).repeat(8, axis=2).repeat(8, axis=3)

    latents = np.random.default_rng(0).standard_normal((2, 4, 150, 70), dtype=np.float32)
    tiled = decode_latents(decode, latents, 8, tile=64, overlap=16)
    np.testing.assert_allclose(tiled, decode(latents), atol=1e-6)


@pytest.mark.parametrize("size", [65, 100, 128, 256, 300])
def test_tile_spans_cover_with_overlap(size):
    spans = _spans(size, 64, 16)
    assert spans[0][0] == 0 and sum(spans[-1]) == size
    assert all(length <= 64 for _, length in spans)
    assert all(a + la - b >= 16 for (a, la), (b, _) in zip(spans, spans[1:]))
