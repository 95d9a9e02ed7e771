"""Loss functions against closed forms."""

import math

import torch

from litedge.distill import losses as L
from litedge.models.configs import build_model


def test_vlb_is_zero_for_the_true_posterior():
    s = L.DDPMSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    x_t = L.q_sample(s, x0, t, noise)
    # v = -1 selects the posterior variance beta~_t; the true eps gives the true posterior mean.
    assert L.vlb_loss(s, -torch.ones_like(x0), noise, x0, x_t, t).abs() < 1e-6
    assert L.vlb_loss(s, torch.ones_like(x0), noise, x0, x_t, t) > 0


def test_vlb_only_trains_the_variance_channels():
    s = L.DDPMSchedule.linear()
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([0, 300])
    eps, var = torch.randn(2, 4, 4, 4, requires_grad=True), torch.zeros(2, 4, 4, 4, requires_grad=True)
    L.vlb_loss(s, var, eps, x0, L.q_sample(s, x0, t, noise), t).backward()
    assert eps.grad is None and var.grad.abs().sum() > 0


def test_schedule_matches_ddpm():
    s = L.DDPMSchedule.linear()
    assert s.num_timesteps == 1000 and math.isclose(float(s.betas[-1]), 0.02)
    assert math.isclose(float(s.alphas_cumprod[0]), 1 - 1e-4)


def test_flow_sample_and_target():
    x0, eps, t = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.tensor([0.25])
    assert torch.allclose(L.flow_sample(x0, t, eps), torch.full_like(x0, 0.25))
    assert L.flow_velocity_mse(torch.ones_like(x0), x0, eps) == 0


def test_attention_taps_record_one_output_per_block():
    model = build_model("tiny-LiT-T2I-XL", teacher=True)
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]),
              encoder_hidden_states=torch.randn(1, 5, 32), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with L.AttentionTaps(model, "pixart") as taps, torch.no_grad():
        model(**kw)
    outputs = taps.clear()
    assert len(outputs) == len(model.transformer_blocks) and outputs[0].shape == (1, 16, 64)
    with torch.no_grad():
        model(**kw)
    assert taps.outputs == []  # hooks removed on exit


def test_min_snr_weights_against_closed_form():
    s = L.DDPMSchedule.linear()
    t = torch.tensor([0, 50, 150, 400, 999])
    w = L.min_snr_weights(s, t, gamma=5.0)
    acp = s.alphas_cumprod[t]
    snr = acp / (1 - acp)
    expected = torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr))
    assert torch.allclose(w.double(), expected, rtol=1e-6)
    assert w[0] < 1e-2 and w[-1] == 1.0  # the least noisy step nearly off, the noisiest at full weight


def test_weighted_epsilon_mse_is_per_sample():
    pred, noise = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert L.epsilon_mse(pred, noise, torch.ones(2)) == L.epsilon_mse(pred, noise) == 2.5
    assert L.epsilon_mse(pred, noise, torch.tensor([1.0, 0.0])) == 0.5  # (1 * 1 + 0 * 4) / 2
