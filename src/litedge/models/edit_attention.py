"""EDiT's linear compressed attention and MM-EDiT's hybrid joint attention (EDiT, Becker et al. 2025).

EDiT keeps linear attention's O(N) cost but strengthens its two weak points:
- queries get local context from a *ConvFusion* block:
  ``ReLU(Linear(X + Conv1x1(LeakyReLU(GN(Conv3x3(X))))))``, the 3x3 conv compressing
  channels by ``reduction`` and the 1x1 conv restoring them;
- keys and values go through a *Spatial Compressor*: ``Conv3x3_depthwise_stride2(Linear(X))``,
  so attention runs over 4x fewer key/value tokens (ReLU kernel on the keys).

MM-EDiT applies this inside SD3's joint attention: image->image pairs use EDiT linear
attention; every pair that involves prompt tokens stays scaled dot-product attention; the
image rows mix the two with a weight eta (``N_img / (N_img + N_txt)`` by default).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from litedge.models.linear_attention import (
    GridAware, heads_channel_first, linear_attention, linear_attention_channels, merge_heads, relu_kernel, split_heads,
)

EtaMode = Literal["token-ratio", "exact"]


def _group_count(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (GroupNorm groups)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class ConvFusion(nn.Module):
    """``X + Conv1x1(LeakyReLU(GN(Conv3x3(X))))`` on (B, N, C) tokens of an (H, W) grid."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.conv3 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(_group_count(hidden), hidden)
        self.conv1 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        y = self.conv1(F.leaky_relu(self.norm(self.conv3(tokens_to_grid(x, grid)))))
        return x + grid_to_tokens(y)


class SpatialCompressor(nn.Module):
    """``Conv3x3_depthwise_stride2(Linear(X))`` for keys and values: (B, N, C) -> 2x (B, M, C).

    M = ceil(H/2) * ceil(W/2), about N / 4.
    """

    def __init__(self, dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.k_down = nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim)
        self.v_down = nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) -> compressed keys (before the kernel) and values, each (B, M, C)."""
        k, v = self.kv(x).chunk(2, dim=-1)
        k = grid_to_tokens(self.k_down(tokens_to_grid(k, grid)))
        v = grid_to_tokens(self.v_down(tokens_to_grid(v, grid)))
        return k, v

    def channels(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` left channel-first (as the convolutions write it): 2x (B, C, M)."""
        b, _, c = x.shape
        kv = tokens_to_grid(self.kv(x), grid)  # (B, 2C, H, W): one transpose for both
        k, v = kv.chunk(2, dim=1)
        return self.k_down(k).reshape(b, c, -1), self.v_down(v).reshape(b, c, -1)


class EDiTAttention(GridAware):
    """EDiT linear compressed self-attention on (B, N, C) image tokens.

    Args:
        dim: token width C.
        heads: number of heads; must divide ``dim``.
        reduction: channel compression of ConvFusion's 3x3 conv.
        qkv_bias: bias on the q / kv projections.
    """

    def __init__(self, dim: int, heads: int, reduction: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if heads <= 0 or dim % heads:
            raise ValueError(f"heads={heads} does not divide the width {dim}: choose a divisor of {dim}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.fusion = ConvFusion(dim, reduction)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.compressor = SpatialCompressor(dim, qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> kernelized q (B, h, N, d), kernelized k and v (B, h, M, d) (the token-major
        reference layout; :meth:`forward` computes the same channel-first)."""
        q = relu_kernel(self.q(self.fusion(x, grid)))
        k, v = self.compressor(x, grid)
        return split_heads(q, self.heads), split_heads(relu_kernel(k), self.heads), split_heads(v, self.heads)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int] | None = None, **_: object) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) latent grid -> (B, N, C); diffusers' extra kwargs are ignored."""
        grid = self._grid(hidden_states, grid)
        b, n, c = hidden_states.shape
        h, d = self.heads, self.head_dim
        q_t = heads_channel_first(relu_kernel(self.q(self.fusion(hidden_states, grid))), h)  # (B, h, d, N)
        k, v = self.compressor.channels(hidden_states, grid)  # (B, C, M): per head a free reshape
        k_t, v_t = relu_kernel(k).reshape(b, h, d, -1), v.reshape(b, h, d, -1)
        out = linear_attention_channels(q_t, k_t, v_t).reshape(b, c, n)  # (B, C, N)
        return self.proj(out.transpose(1, 2))


class MMEDiTJointAttention(GridAware):
    """MM-EDiT: SD3 joint attention with EDiT linear attention for image->image pairs.

    Built from the teacher's joint ``Attention``: the prompt-side projections and the
    q/k RMS norms are inherited (the same module objects), the image-side projections are
    new EDiT ones (ConvFusion queries, spatially compressed keys/values).

    Image rows: ``eta * LinAttn(img -> img) + (1 - eta) * SDPA(img -> prompt)``;
    prompt rows: ``SDPA(prompt -> [compressed img ; prompt])``. ``eta="token-ratio"`` uses
    ``N_img / (N_img + N_txt)``; ``eta="exact"`` uses each row's own share
    ``S_lin / (S_lin + S_txt)`` with ``S_lin = phi(q) . sum_j phi(k_j)`` and
    ``S_txt = sum_t exp(q . k_t / sqrt(d))``.
    """

    def __init__(self, teacher_attn: nn.Module, reduction: int = 4, eta: EtaMode = "token-ratio") -> None:
        super().__init__()
        if eta not in ("token-ratio", "exact"):
            raise ValueError(f"eta must be 'token-ratio' or 'exact', got {eta!r}")
        dim = teacher_attn.to_q.in_features
        self.dim, self.heads, self.eta = dim, teacher_attn.heads, eta
        self.head_dim = dim // self.heads
        self.fusion = ConvFusion(dim, reduction)
        self.q = nn.Linear(dim, dim)
        self.compressor = SpatialCompressor(dim)
        self.proj = nn.Linear(dim, dim)
        # Inherited from the teacher: prompt projections and the per-head RMS norms.
        for name in ("add_q_proj", "add_k_proj", "add_v_proj", "norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, getattr(teacher_attn, name))
        self.to_add_out = None if teacher_attn.context_pre_only else teacher_attn.to_add_out

    @staticmethod
    def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)

    def project(self, x: torch.Tensor, context: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Image (B, N, C) and prompt (B, L, C) tokens -> per-head q/k/v, each (B, h, *, d).

        Keys ``q_img`` (N rows), ``k_img``/``v_img`` (M compressed rows; ``k_img`` before
        the kernel), ``q_txt``/``k_txt``/``v_txt`` (L rows, normed as in the teacher).
        """
        h = self.heads
        k_img, v_img = self.compressor(x, grid)
        return {
            "q_img": split_heads(self.q(self.fusion(x, grid)), h),
            "k_img": split_heads(k_img, h),
            "v_img": split_heads(v_img, h),
            "q_txt": self._norm(self.norm_added_q, split_heads(self.add_q_proj(context), h)),
            "k_txt": self._norm(self.norm_added_k, split_heads(self.add_k_proj(context), h)),
            "v_txt": split_heads(self.add_v_proj(context), h),
        }

    def image_mix_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """eta for each image row: a number (token ratio) or a (B, h, N, 1) tensor (exact)."""
        n_img, n_txt = p["q_img"].shape[-2], p["q_txt"].shape[-2]
        if self.eta == "token-ratio":
            return n_img / (n_img + n_txt)  # stays symbolic when traced for a dynamic-shape export
        q, k = relu_kernel(p["q_img"]).float(), relu_kernel(p["k_img"]).float()
        log_s_lin = torch.log(q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1))  # (B, h, N, 1)
        qn = self._norm(self.norm_q, p["q_img"]).float()
        logits = qn @ p["k_txt"].float().transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, N, L)
        log_s_txt = torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.sigmoid(log_s_lin - log_s_txt).to(p["q_img"].dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int] | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, C) and prompt tokens (B, L, C) -> the same two shapes."""
        grid = self._grid(hidden_states, grid)
        p = self.project(hidden_states, encoder_hidden_states, grid)
        q_soft = self._norm(self.norm_q, p["q_img"])
        k_soft = self._norm(self.norm_k, p["k_img"])

        img_lin = linear_attention(relu_kernel(p["q_img"]), relu_kernel(p["k_img"]), p["v_img"])
        img_txt = F.scaled_dot_product_attention(q_soft, p["k_txt"], p["v_txt"])  # (B, h, N, d)
        eta = self.image_mix_weight(p)
        img = eta * img_lin + (1 - eta) * img_txt

        keys = torch.cat([k_soft, p["k_txt"]], dim=2)  # (B, h, M + L, d)
        values = torch.cat([p["v_img"], p["v_txt"]], dim=2)
        txt = F.scaled_dot_product_attention(p["q_txt"], keys, values)  # (B, h, L, d)

        txt = merge_heads(txt)
        if self.to_add_out is not None:
            txt = self.to_add_out(txt)
        return self.proj(merge_heads(img)), txt
