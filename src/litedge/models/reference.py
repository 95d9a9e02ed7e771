"""Naive O(N^2) references of the linear attention formulas, for tests.

Each builds the full (N x M) similarity matrix explicitly, in float64, from the same
projections as the module under test, so a test compares the associative
``phi(Q)(phi(K)^T V)`` evaluation against the plain definition of the attention.
"""

from __future__ import annotations

import math

import torch

from litedge.models.edit_attention import EDiTAttention, MMEDiTJointAttention
from litedge.models.linear_attention import KERNEL_EPS, LiTAttention, merge_heads, relu_kernel


def naive_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_j (q_i . k_j) v_j / M`` over ``(sum_j q_i . k_j) / M + eps``, with the (N, M) matrix built.

    q: (B, h, N, d), k: (B, h, M, d) (both non-negative), v: (B, h, M, dv) -> (B, h, N, dv), float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    m = k.shape[-2]
    sim = q @ k.transpose(-2, -1)  # (B, h, N, M): the O(N^2) matrix
    return (sim @ v / m) / (sim.sum(dim=-1, keepdim=True) / m + KERNEL_EPS)


def naive_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` in float64: (B, h, N, d), (B, h, M, d), (B, h, M, dv) -> (B, h, N, dv)."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


@torch.no_grad()
def lit_reference(attn: LiTAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LiTAttention's output computed with the explicit N x N matrix: (B, N, C) -> (B, N, C), float64."""
    q, k, v = attn.project(x)
    out = merge_heads(naive_linear_attention(q, k, v)) + attn.local_term(v, grid).double()
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@torch.no_grad()
def edit_reference(attn: EDiTAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """EDiTAttention's output computed with the explicit N x M matrix: (B, N, C) -> (B, N, C), float64."""
    q, k, v = attn.project(x, grid)
    out = merge_heads(naive_linear_attention(q, k, v))
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@torch.no_grad()
def mmedit_reference(
    attn: MMEDiTJointAttention, x: torch.Tensor, context: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MM-EDiT joint attention with every block of the joint matrix built explicitly, float64.

    x: (B, N, C) image tokens, context: (B, L, C) prompt tokens -> ((B, N, C), (B, L, C)).
    """
    p = attn.project(x, context, grid)
    q_soft, k_soft = attn._norm(attn.norm_q, p["q_img"]), attn._norm(attn.norm_k, p["k_img"])
    q_lin, k_lin = relu_kernel(p["q_img"]).double(), relu_kernel(p["k_img"]).double()
    n_img, n_txt = x.shape[1], context.shape[1]

    img_lin = naive_linear_attention(q_lin, k_lin, p["v_img"])
    img_txt = naive_softmax_attention(q_soft, p["k_txt"], p["v_txt"])
    if attn.eta == "token-ratio":
        eta = n_img / (n_img + n_txt)
    else:
        s_lin = (q_lin @ k_lin.transpose(-2, -1)).sum(dim=-1, keepdim=True)
        logits = q_soft.double() @ p["k_txt"].double().transpose(-2, -1) / math.sqrt(attn.head_dim)
        s_txt = logits.exp().sum(dim=-1, keepdim=True)
        eta = s_lin / (s_lin + s_txt)
    img = merge_heads(eta * img_lin + (1 - eta) * img_txt)

    keys = torch.cat([k_soft, p["k_txt"]], dim=2)
    values = torch.cat([p["v_img"], p["v_txt"]], dim=2)
    txt = merge_heads(naive_softmax_attention(p["q_txt"], keys, values))
    if attn.to_add_out is not None:
        txt = txt @ attn.to_add_out.weight.double().T + attn.to_add_out.bias.double()
    img = img @ attn.proj.weight.double().T + attn.proj.bias.double()
    return img, txt
