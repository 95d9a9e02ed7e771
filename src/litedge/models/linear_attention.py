"""LiT's linear attention (LiT supplementary, Alg. 1) and the fp32 kernel it shares with EDiT.

Softmax attention costs O(N^2 d) for N tokens; with a non-negative kernel phi the product
``phi(Q) (phi(K)^T V)`` is associative and costs O(N d^2). LiT uses phi = ReLU + 1e-6, few
heads, and a 5x5 depthwise convolution over V (shared by all heads) that restores the
local detail linear attention loses.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_EPS = 1e-6


def relu_kernel(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = ReLU(x) + 1e-6: the non-negative feature map of LiT and EDiT."""
    return F.relu(x) + KERNEL_EPS


def _fp32_region(device_type: str):
    """Disable autocast so the sums below run in fp32 even inside an fp16/bf16 autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = KERNEL_EPS) -> torch.Tensor:
    """Normalized linear attention ``phi(q) (phi(k)^T v) / (phi(q) . sum phi(k))``, in fp32.

    Args:
        q: (B, heads, N, d) queries, already passed through the kernel (non-negative).
        k: (B, heads, M, d) keys, already passed through the kernel (non-negative).
        v: (B, heads, M, dv) values.
        eps: added to the normalizer ``q . mean_M(k)``.

    Returns:
        (B, heads, N, dv) in the dtype of ``q``. The key/value sum and the normalizer are
        accumulated in fp32 whatever the input dtype (fp16 overflows at 2K token counts).
    """
    dtype = q.dtype
    with _fp32_region(q.device.type):
        q, k, v = q.float(), k.float(), v.float()
        m = k.shape[-2]
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps)  # (B, h, N, 1)
        kv = (k.transpose(-2, -1) * m**-0.5) @ (v * m**-0.5)  # (B, h, d, dv)
        out = (q @ kv) * z  # (B, h, N, dv)
    return out.to(dtype)


def linear_attention_channels(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                              eps: float = KERNEL_EPS) -> torch.Tensor:
    """:func:`linear_attention` in the channel-first layout: the same numbers, fewer layout copies.

    Tokens are the last axis, so a (B, C, N) tensor (what a convolution reads and writes) is
    the per-head operand after a free reshape to (B, heads, d, N): no head split or merge
    transposes, and the two 1/sqrt(M) scalings of the (B, heads, M, d) keys and values
    become one factor M on the (B, heads, 1, N) normalizer.

    Args:
        q_t: (B, heads, d, N) queries, already passed through the kernel (non-negative).
        k_t: (B, heads, d, M) keys, already passed through the kernel (non-negative).
        v_t: (B, heads, dv, M) values.
        eps: added to the normalizer ``q . mean_M(k)``.

    Returns:
        (B, heads, dv, N), the transpose of :func:`linear_attention`'s (B, heads, N, dv), in
        the dtype of ``q_t``; the sums and the normalizer are fp32 whatever the input dtype.
    """
    dtype = q_t.dtype
    with _fp32_region(q_t.device.type):
        q_t, k_t, v_t = q_t.float(), k_t.float(), v_t.float()
        m = k_t.shape[-1]
        # 1 / (M (q . mean(k) + eps)), (B, h, 1, N): the 1/M of the key-value mean rides on the normalizer
        z = 1.0 / ((k_t.mean(dim=-1).unsqueeze(-2) @ q_t + eps) * m)
        vk = v_t @ k_t.transpose(-2, -1)  # (B, h, dv, d): the key-value sum (k^T v)^T
        out = (vk @ q_t) * z  # (B, h, dv, N)
    return out.to(dtype)


def heads_channel_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) tokens -> (B, heads, d, N): one transpose."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 3, 1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class GridAware(nn.Module):
    """Base for token mixers that need the latent grid (H, W) of their (B, N, C) tokens.

    The grid is passed explicitly (``forward(x, grid=(H, W))``) or, inside a diffusers
    transformer that does not know about it, set by :func:`litedge.models.linearize.attach_grid_hook`
    before each forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grid: tuple[int, int] | None = None

    def _grid(self, x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
        grid = grid if grid is not None else self.grid
        if grid is None:
            raise ValueError(
                f"{type(self).__name__} needs the latent grid (H, W) of its {x.shape[1]} tokens: "
                "pass grid=(H, W) or call it inside a linearized transformer"
            )
        return grid


class LiTAttention(GridAware):
    """ReLU linear attention with a depthwise conv on V (LiT, Alg. 1).

    Parameter names (``q``, ``kv``, ``dwc``, ``proj``) follow the official LiT code so its
    checkpoints load unchanged.

    Args:
        dim: token width C.
        heads: number of heads (LiT uses few: 2-4); must divide ``dim``.
        kernel_size: size of the depthwise conv over V (5 in LiT).
        qkv_bias: bias on the q / kv projections.
    """

    def __init__(self, dim: int, heads: int, kernel_size: int = 5, qkv_bias: bool = True) -> None:
        super().__init__()
        if heads <= 0 or dim % heads:
            raise ValueError(f"heads={heads} does not divide the width {dim}: choose a divisor of {dim}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.dwc = nn.Conv2d(
            self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim
        )
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> kernelized q, k and raw v, each (B, heads, N, d) (the token-major
        reference layout; :meth:`forward` computes the same in the channel-first one)."""
        k, v = self.kv(x).chunk(2, dim=-1)  # (B, N, C) each
        q = relu_kernel(self.q(x))
        return split_heads(q, self.heads), split_heads(relu_kernel(k), self.heads), split_heads(v, self.heads)

    def local_term(self, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The depthwise conv over V, shared by all heads: (B, heads, N, d) -> (B, N, C) (the
        reference layout, as :meth:`project`)."""
        b, h, n, d = v.shape
        height, width = grid
        v = v.reshape(b * h, height, width, d).permute(0, 3, 1, 2)  # (B*h, d, H, W)
        out = self.dwc(v).reshape(b, h * d, n)  # (B, C, N), channels ordered (head, d)
        return out.transpose(1, 2)  # (B, N, C)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int] | None = None, **_: object) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) latent grid (N = H * W) -> (B, N, C).

        Extra keyword arguments that diffusers passes to self-attention (``attention_mask``,
        ``encoder_hidden_states=None``) are accepted and ignored.
        """
        grid = self._grid(hidden_states, grid)
        b, n, c = hidden_states.shape
        k, v = self.kv(hidden_states).chunk(2, dim=-1)  # (B, N, C) each
        q_t = heads_channel_first(relu_kernel(self.q(hidden_states)), self.heads)  # (B, h, d, N)
        k_t = heads_channel_first(relu_kernel(k), self.heads)
        v_t = heads_channel_first(v, self.heads)
        # The conv reads V channel-first as it is: (B, h, d, N) is (B * h, d, H, W) after a reshape.
        local = self.dwc(v_t.reshape(b * self.heads, self.head_dim, grid[0], grid[1])).reshape(b, c, n)
        out = linear_attention_channels(q_t, k_t, v_t).reshape(b, c, n) + local  # (B, C, N), channels (head, d)
        return self.proj(out.transpose(1, 2))
