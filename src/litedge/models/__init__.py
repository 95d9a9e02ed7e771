"""PyTorch definitions of the linear DiT families (needs the ``export`` or ``distill`` extra).

- :class:`LiTAttention`, :class:`EDiTAttention`, :class:`MMEDiTJointAttention`: token mixers
  taking (B, N, C) tokens and their latent grid (H, W).
- :func:`linearize`: a diffusers softmax transformer -> a linear student (weight inheritance).
- :func:`load_model`: one entry point for diffusers directories, safetensors and original ``.pth``.
- :func:`build_model` / :data:`CONFIGS`: the papers' named configurations and tiny variants.
"""

from litedge.models.configs import CONFIGS, ModelSpec, build_model, get_config
from litedge.models.edit_attention import EDiTAttention, MMEDiTJointAttention
from litedge.models.linear_attention import LiTAttention, linear_attention
from litedge.models.linearize import LinearizeConfig, LinearizeReport, linearize
from litedge.models.loading import LoadedModel, load_model
from litedge.models.student import load_transformer, save_transformer

__all__ = [
    "CONFIGS", "EDiTAttention", "LiTAttention", "LinearizeConfig", "LinearizeReport", "LoadedModel", "MMEDiTJointAttention",
    "ModelSpec", "build_model", "get_config", "linear_attention", "linearize", "load_model", "load_transformer", "save_transformer",
]
