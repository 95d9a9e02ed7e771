"""The demo's deep-compression autoencoder: diffusers ``AutoencoderDC`` (SANA's DC-AE), f32.

Why f32: the transformer trains on 2 CPU cores, where 4,096 tokens per image are out of
reach. At f32 a 256 px image is an 8x8 latent (64 tokens at patch 1, what the v1 demo had
at 64 px), 1024 px is 32x32 (1,024 tokens) and 2048 px is 64x64 (4,096 tokens), so the
resolution a user sees grows 16x while the training cost of the base stage stays put.

Why it works for this domain: scenes are flat colours with straight or round edges, so a
32x32 patch holds at most a few edges; 32 latent channels (SANA's f32c32) describe them.
The network is ResBlocks only (no attention) with pixel-(un)shuffle resampling: it is
convolutional, trained on 128 px crops, and applied at any size. Crops are rendered
directly (``render(window=...)``) from scenes drawn at 256-2048 px, so it sees edges at
every scale the transformer will produce; most crops are centred near an object.

Loss: L1 + L2 + an L1 term on image gradients (sharp shape edges). DC-AE is deterministic
(no KL): ``scaling_factor`` = 1 / std of the latents, measured after training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from litedge.demo.shapes import CATEGORIES, render, sample_scene

AE_TRAIN_SIZES = (256, 512, 1024, 2048)  # scene sizes the crops come from ...
AE_SIZE_WEIGHTS = (0.35, 0.3, 0.25, 0.1)  # ... and how often


def make_autoencoder(latent_channels: int, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...],
                     decoder_layers: tuple[int, ...], seed: int = 0):
    """A ResBlock-only ``AutoencoderDC``, factor 2**(len(channels) - 1) (32 for six levels)."""
    from diffusers import AutoencoderDC

    levels = len(encoder_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderDC(in_channels=3, latent_channels=latent_channels, encoder_block_types="ResBlock",
                             decoder_block_types="ResBlock", encoder_block_out_channels=encoder_channels,
                             decoder_block_out_channels=decoder_channels, encoder_layers_per_block=(1,) * levels,
                             decoder_layers_per_block=decoder_layers, encoder_qkv_multiscales=((),) * levels,
                             decoder_qkv_multiscales=((),) * len(decoder_channels), decoder_norm_types="rms_norm")


def crop_batch(rng: np.random.Generator, batch: int, crop: int) -> np.ndarray:
    """``batch`` random crops (B, crop, crop, 3) uint8 of random scenes rendered at AE_TRAIN_SIZES.

    Three crops in four are centred within an object's reach (a random object's centre +-
    its half side + half a crop), the rest anywhere: mostly edges, some empty background.
    """
    out = np.empty((batch, crop, crop, 3), np.uint8)
    for i in range(batch):
        scene = sample_scene(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        size = int(rng.choice(AE_TRAIN_SIZES, p=AE_SIZE_WEIGHTS))
        if rng.random() < 0.75:
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            reach = obj.size * size / 2 + crop / 2
            cx, cy = obj.cx * size + rng.uniform(-reach, reach, 2) * 0.7
        else:
            cx, cy = rng.uniform(0, size, 2)
        left = int(np.clip(cx - crop / 2, 0, size - crop))
        top = int(np.clip(cy - crop / 2, 0, size - crop))
        out[i] = np.asarray(render(scene, size, window=(left, top, crop, crop)))
    return out


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance of horizontal and vertical finite differences of (B, 3, H, W) images."""
    return ((a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])).abs().mean() + \
        ((a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])).abs().mean()


def autoencoder_loss(ae, pixels: torch.Tensor, edge_weight: float) -> dict[str, torch.Tensor]:
    """pixels (B, 3, H, W) in [-1, 1] -> named terms and ``total`` (L1 + L2 + edge_weight * gradient L1)."""
    recon = ae.decode(ae.encode(pixels).latent).sample.float()
    terms = {"l1": (recon - pixels).abs().mean(), "l2": F.mse_loss(recon, pixels), "edge": _grad_l1(recon, pixels)}
    terms["total"] = terms["l1"] + terms["l2"] + edge_weight * terms["edge"]
    return terms


@torch.no_grad()
def encode(ae, images: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> unscaled latents (B, C, H/32, W/32) float32."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return ae.encode(x).latent.float().numpy()
