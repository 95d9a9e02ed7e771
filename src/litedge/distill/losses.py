"""Distillation losses, one small function each (logged separately by the trainer).

- task: epsilon MSE (+ the learned-variance VLB term, as DiT's / PixArt's
  ``GaussianDiffusion``) for DDPM teachers; rectified-flow velocity MSE for SD3 teachers;
- LiT hybrid distillation: student noise and variance channels against the teacher's;
- EDiT / MM-EDiT feature distillation: each replaced self-attention's output against the
  teacher's self-attention output in the same block (:class:`AttentionTaps`).

Shapes: latents and model outputs are (B, C, H, W); ``t`` is (B,) int64 DDPM steps in
[0, 1000) or (B,) float flow times in (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DDPMSchedule:
    """DDPM's linear beta schedule and the posterior q(x_{t-1} | x_t, x_0) terms (float64)."""

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPMSchedule":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        acp = torch.cumprod(1.0 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        return cls(
            betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev,
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp),
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as (B, 1, 1, 1) in ``like``'s dtype and device."""
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: DDPMSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps."""
    acp = _at(schedule.alphas_cumprod, t, x0)
    return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise


def flow_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps; t (B,) in (0, 1)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def split_learned_sigma(output: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 2C, H, W) -> eps (B, C, H, W), variance values (B, C, H, W); (B, C, ...) -> (eps, None)."""
    if output.shape[1] == 2 * in_channels:
        return output[:, :in_channels], output[:, in_channels:]
    return output, None


def epsilon_mse(pred_eps: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of (B, C, H, W) noise predictions; ``weights`` (B,) scale each sample's term."""
    if weights is None:
        return F.mse_loss(pred_eps.float(), noise.float())
    per_sample = (pred_eps.float() - noise.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (weights.to(per_sample) * per_sample).mean()


def min_snr_weights(schedule: DDPMSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the epsilon loss (Hang et al., 2023): min(SNR_t, gamma) / SNR_t, (B,) float32.

    1 where the sample is noisier than SNR = gamma, smaller at low noise, where the epsilon
    loss otherwise spends its gradient on detail the image already shows.
    """
    acp = schedule.alphas_cumprod.to(t.device)[t]
    snr = acp / (1.0 - acp)
    return (snr.clamp(max=gamma) / snr).float()


def flow_velocity_mse(pred_velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """SD3's rectified-flow target: d x_t / d t = eps - x0."""
    return F.mse_loss(pred_velocity.float(), (noise - x0).float())


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretized to 256 bins (the t = 0 decoder term)."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_loss(
    schedule: DDPMSchedule, var_values: torch.Tensor, pred_eps: torch.Tensor,
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
) -> torch.Tensor:
    """The learned-variance VLB term of DiT / PixArt (bits per dim, batch mean).

    The model's log-variance interpolates between log beta_t and log beta~_t with
    ``frac = (v + 1) / 2``; its mean comes from ``pred_eps`` detached, so this term only
    trains the variance channels (Nichol & Dhariwal's L_hybrid).
    """
    x0, x_t, var_values = x0.double(), x_t.double(), var_values.double()
    eps = pred_eps.detach().double()
    min_log = _at(schedule.posterior_log_variance_clipped, t, x0)
    max_log = _at(torch.log(schedule.betas), t, x0)
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    acp = _at(schedule.alphas_cumprod, t, x0)
    pred_x0 = x_t / acp.sqrt() - (1.0 / acp - 1.0).sqrt() * eps
    c1, c2 = _at(schedule.posterior_mean_coef1, t, x0), _at(schedule.posterior_mean_coef2, t, x0)
    model_mean, true_mean = c1 * pred_x0 + c2 * x_t, c1 * x0 + c2 * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl).mean().float()


def noise_distill_mse(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """LiT hybrid distillation, noise part: the student's prediction against the teacher's."""
    return F.mse_loss(student_eps.float(), teacher_eps.detach().float())


def variance_distill_mse(student_var: torch.Tensor, teacher_var: torch.Tensor) -> torch.Tensor:
    """LiT hybrid distillation, variance part (learned-sigma channels)."""
    return F.mse_loss(student_var.float(), teacher_var.detach().float())


def feature_distill_mse(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of MSE(student self-attention output, teacher's), each (B, N_img, D)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise RuntimeError(f"feature taps mismatch: {len(student_feats)} student vs {len(teacher_feats)} teacher outputs")
    losses = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean()


class AttentionTaps:
    """Forward hooks that record the self-attention outputs of a transformer, block by block.

    Taps every ``attn1`` (PixArt, DiT) or ``attn`` / ``attn2`` (SD3) of
    ``model.transformer_blocks``; a joint attention returns (image, text) and only the image
    part is kept. Use as a context manager; ``outputs`` is cleared with :meth:`clear`.
    """

    ATTRS = ("attn1", "attn", "attn2")

    def __init__(self, model: nn.Module, kind: str):
        attrs = ("attn", "attn2") if kind == "sd3" else ("attn1",)
        self.modules = [getattr(b, a) for b in model.transformer_blocks for a in attrs if getattr(b, a, None) is not None]
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args, output) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> "AttentionTaps":
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out


@dataclass(frozen=True)
class LossWeights:
    """total = task * (task + vlb) + noise * noise + var * var + feature * feature."""

    task: float = 1.0
    noise: float = 0.5
    var: float = 0.05
    feature: float = 0.0


def compute_losses(
    w: LossWeights, kind: str, schedule: DDPMSchedule, s_out: torch.Tensor, t_out: torch.Tensor,
    x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
    s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], in_channels: int,
) -> dict[str, torch.Tensor]:
    """Named loss terms (task, vlb, noise, var, feature) and their weighted ``total``.

    ``kind`` "sd3" means rectified flow (outputs are velocities); otherwise DDPM epsilon with
    learned-sigma channels when the outputs have 2 * in_channels.
    """
    terms: dict[str, torch.Tensor] = {}
    if kind == "sd3":
        terms["task"] = flow_velocity_mse(s_out, x0, noise)
        terms["noise"] = noise_distill_mse(s_out, t_out)
    else:
        s_eps, s_var = split_learned_sigma(s_out, in_channels)
        t_eps, t_var = split_learned_sigma(t_out, in_channels)
        terms["task"] = epsilon_mse(s_eps, noise)
        terms["noise"] = noise_distill_mse(s_eps, t_eps)
        if s_var is not None:
            terms["vlb"] = vlb_loss(schedule, s_var, s_eps, x0, x_t, t)
            terms["var"] = variance_distill_mse(s_var, t_var)
    if w.feature > 0:
        terms["feature"] = feature_distill_mse(s_feats, t_feats)
    total = w.task * (terms["task"] + terms.get("vlb", 0.0)) + w.noise * terms["noise"]
    terms["total"] = total + w.var * terms.get("var", 0.0) + w.feature * terms.get("feature", 0.0)
    return terms
