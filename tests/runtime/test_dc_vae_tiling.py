"""Tiled VAE decoding with a 32x deep-compression autoencoder (diffusers AutoencoderDC).

At f32 one latent pixel is 32 image pixels, so the decoder's context (its receptive field)
spans several latent pixels: the runtime's tiles for factors >= 16 are 32 latents with a
16-latent overlap, blended over the middle half of each overlap (litedge.runtime.vae). A
ResBlock-only DC-AE (no attention: every output pixel depends on a bounded latent window)
must then decode with 32-latent tiles (SANA's width) as untiled, to well under one 8-bit level.
"""

import numpy as np
import torch

from litedge.runtime.vae import _fade, _ramp, decode_latents, default_tiling
from tests.export.test_dc_vae import LATENT_CHANNELS, tiny_dc_vae


def _decoder(vae):
    def decode(z: np.ndarray) -> np.ndarray:  # (B, 16, h, w) scaled latent -> (B, 3, 32h, 32w) in [-1, 1]
        with torch.no_grad():
            return vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
    return decode


def test_tiled_equals_untiled_for_a_resblock_dc_ae():
    torch.set_num_threads(1)
    vae = tiny_dc_vae()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the init, so that the decoder's context matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    decode = _decoder(vae)
    latents = np.random.default_rng(0).standard_normal((1, LATENT_CHANNELS, 40, 48), dtype=np.float32)  # 1280x1536
    tile, overlap = default_tiling(32)
    assert (tile, overlap) == (32, 16)
    tiled = decode_latents(decode, latents, 32, tile, overlap)  # 2 x 2 tiles
    untiled = decode(latents)
    diff = np.abs(tiled - untiled) / 2 * 255  # 8-bit levels
    print(f"f32 DC-AE, 1280x1536 px, tiles 32 latents / overlap 16: max |diff| {diff.max():.3f}/255, "
          f"mean {diff.mean():.4f}/255")
    assert tiled.shape == untiled.shape == (1, 3, 1280, 1536)
    assert diff.max() < 1.0 and diff.mean() < 0.01


def test_the_old_full_overlap_fade_would_show_seams():
    """The reason for trimming: fading over the whole overlap weights each tile's border pixels."""
    torch.set_num_threads(1)
    vae = tiny_dc_vae()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    decode = _decoder(vae)
    latents = np.random.default_rng(0).standard_normal((1, LATENT_CHANNELS, 40, 24), dtype=np.float32)
    untiled = decode(latents)
    err = np.abs(decode_latents(decode, latents, 32, 32, 16) - untiled).max() / 2 * 255
    import litedge.runtime.vae as vae_module

    def full_fade(n):
        return (np.arange(n, dtype=np.float32) + 0.5) / n

    original = vae_module._fade
    vae_module._fade = full_fade
    try:
        old = np.abs(decode_latents(decode, latents, 32, 32, 16) - untiled).max() / 2 * 255
    finally:
        vae_module._fade = original
    print(f"max |tiled - untiled|: trimmed fade {err:.3f}/255, full-overlap fade {old:.2f}/255")
    assert err < 1.0 < old


def test_fades_of_neighbours_sum_to_one():
    for n in (1, 2, 7, 16, 128, 512):
        np.testing.assert_allclose(_fade(n) + _fade(n)[::-1], 1.0, atol=1e-6)
    w = _ramp(40, 16, 8)
    assert w[:4].max() == 0 and w[12:32].min() == 1 and w[-2:].max() == 0


def test_default_tiling_by_factor_and_decoder_width():
    assert default_tiling(4) == default_tiling(8) == default_tiling(8, [128]) == (64, 16)  # f8: 512 px, as before
    assert default_tiling(32) == default_tiling(32, [128]) == (32, 16)  # SANA's DC-AE width: 1024 px tiles
    assert default_tiling(32, [16, 32, 64]) == (90, 16)  # the demo's: 2048 px (64 latents) in one pass
    assert default_tiling(32, [512]) == (32, 16) and default_tiling(16, [256]) == (45, 16)  # >= 32 latents
