"""Named configurations: the papers' models and a ``tiny-`` variant of each for tests and demos.

A configuration is a teacher architecture (a diffusers transformer config) plus how its
attention is linearized. ``build_model(name)`` makes the random-weight student (or, with
``teacher=True``, the softmax teacher), e.g. to export an architecture before it is trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from litedge.errors import LitedgeError

Base = Literal["dit", "pixart-sigma", "sd3.5"]


@dataclass(frozen=True)
class ModelSpec:
    """One named model: its teacher's diffusers class and config, and its linear attention."""

    name: str
    family: Literal["lit", "edit", "mmedit"]
    base: Base
    teacher_class: str
    teacher_config: dict = field(default_factory=dict)
    heads: int | None = None  # linear attention heads (None: the family default)

    @property
    def task(self) -> str:
        return "class-conditional" if self.base == "dit" else "text-to-image"


def _dit(layers: int, width: int, heads: int, sample_size: int = 32) -> dict:
    """DiT-{S,B,L,XL}/2 at 256 px (32x32 latents), learned sigma."""
    return dict(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", activation_fn="gelu-approximate",
    )


def _pixart_sigma(layers: int, heads: int, head_dim: int, caption_channels: int, sample_size: int) -> dict:
    """PixArt-Sigma: cross-attention to T5 features, adaLN-single, learned sigma."""
    width = heads * head_dim
    return dict(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, cross_attention_dim=width, caption_channels=caption_channels,
        sample_size=sample_size, patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        interpolation_scale=max(sample_size // 64, 1), use_additional_conditions=False,
        attention_bias=True,
    )


def _sd35(layers: int, heads: int, head_dim: int, joint_dim: int, pooled_dim: int, dual: int, sample_size: int) -> dict:
    """SD3.5-Medium-like MM-DiT with dual attention in the first ``dual`` blocks."""
    return dict(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=max(sample_size * 3, 16), dual_attention_layers=tuple(range(dual)),
        qk_norm="rms_norm",
    )


_SPECS = [
    ModelSpec("LiT-S/2", "lit", "dit", "DiTTransformer2DModel", _dit(12, 384, 6), heads=2),
    ModelSpec("LiT-B/2", "lit", "dit", "DiTTransformer2DModel", _dit(12, 768, 12), heads=3),
    ModelSpec("LiT-L/2", "lit", "dit", "DiTTransformer2DModel", _dit(24, 1024, 16), heads=4),
    ModelSpec("LiT-XL/2", "lit", "dit", "DiTTransformer2DModel", _dit(28, 1152, 16), heads=4),
    ModelSpec("LiT-T2I-XL", "lit", "pixart-sigma", "PixArtTransformer2DModel", _pixart_sigma(28, 16, 72, 4096, 128), heads=2),
    ModelSpec("EDiT-PixArt-Sigma", "edit", "pixart-sigma", "PixArtTransformer2DModel", _pixart_sigma(28, 16, 72, 4096, 128), heads=16),
    ModelSpec("MM-EDiT-SD3.5-Medium", "mmedit", "sd3.5", "SD3Transformer2DModel", _sd35(24, 24, 64, 4096, 2048, 13, 128)),
]
_TINY = {
    "LiT-S/2": _dit(2, 64, 4, sample_size=8),
    "LiT-B/2": _dit(2, 96, 4, sample_size=8),
    "LiT-L/2": _dit(3, 128, 4, sample_size=8),
    "LiT-XL/2": _dit(3, 128, 4, sample_size=8),
    "LiT-T2I-XL": _pixart_sigma(2, 4, 16, 32, 8),
    "EDiT-PixArt-Sigma": _pixart_sigma(2, 4, 16, 32, 8),
    "MM-EDiT-SD3.5-Medium": _sd35(2, 4, 16, 32, 24, 1, 8),
}
_TINY_HEADS = {"LiT-B/2": 3, "LiT-L/2": 4, "LiT-XL/2": 4, "EDiT-PixArt-Sigma": 4}

CONFIGS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
CONFIGS.update(
    {
        f"tiny-{s.name}": dataclasses.replace(
            s, name=f"tiny-{s.name}", teacher_config=_TINY[s.name], heads=_TINY_HEADS.get(s.name, 2 if s.family == "lit" else None)
        )
        for s in _SPECS
    }
)


def get_config(name: str) -> ModelSpec:
    """The named configuration; LitedgeError listing the known names otherwise."""
    if name not in CONFIGS:
        raise LitedgeError(f"unknown config {name!r}: choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def build_model(name: str, *, teacher: bool = False, seed: int = 0):
    """A random-weight model of a named configuration (the student, or its softmax teacher).

    Returns a diffusers transformer; the student has its self-attention linearized.
    """
    import diffusers
    import torch

    from litedge.models.linearize import LinearizeConfig, linearize_

    spec = get_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(diffusers, spec.teacher_class).from_config(spec.teacher_config)
        if not teacher:
            linearize_(model, LinearizeConfig(family=spec.family, heads=spec.heads))
    return model.eval()
