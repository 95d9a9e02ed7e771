"""linearize(): weight inheritance, shapes, save -> load, and clear errors."""

import pytest
import torch

from litedge.errors import LitedgeError
from litedge.models.configs import build_model, get_config
from litedge.models.edit_attention import EDiTAttention, MMEDiTJointAttention
from litedge.models.linear_attention import LiTAttention
from litedge.models.linearize import linearize
from litedge.models.student import load_transformer, save_transformer

CASES = {  # tiny teacher config -> family, the module that must replace self-attention
    "tiny-LiT-T2I-XL": ("lit", LiTAttention),
    "tiny-EDiT-PixArt-Sigma": ("edit", EDiTAttention),
    "tiny-LiT-S/2": ("lit", LiTAttention),
    "tiny-MM-EDiT-SD3.5-Medium": ("mmedit", MMEDiTJointAttention),
}


def forward_inputs(model, batch: int = 2, height: int = 8, width: int = 8, seed: int = 0) -> dict:
    """Random inputs of the right kind for a tiny PixArt / DiT / SD3 transformer."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kw = {"hidden_states": torch.randn(batch, cfg.in_channels, height, width, generator=g),
          "timestep": torch.tensor([10, 700][:batch])}
    name = type(model).__name__
    if name == "DiTTransformer2DModel":
        kw["class_labels"] = torch.tensor([3, 7][:batch])
    elif name == "PixArtTransformer2DModel":
        kw["encoder_hidden_states"] = torch.randn(batch, 6, cfg.caption_channels, generator=g)
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        kw["encoder_hidden_states"] = torch.randn(batch, 6, cfg.joint_attention_dim, generator=g)
        kw["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return kw


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialized tensors (adaLN-zero, scale-shift tables) random values, so a
    weight that is silently skipped changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", CASES)
def test_student_inherits_every_other_weight(name):
    family, module_type = CASES[name]
    teacher = randomize(build_model(name, teacher=True))
    student, report = linearize(teacher, family, get_config(name).heads, seed=0)

    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    assert report.inherited and report.new and report.dropped
    for key in report.inherited:
        assert torch.equal(student_sd[key], teacher_sd[key]), key
    # Everything that is not a replaced self-attention is inherited.
    assert all(".attn1." in k or ".attn." in k or ".attn2." in k for k in report.dropped + report.new)
    assert not any(".attn2." in k for k in report.dropped) or family == "mmedit"  # PixArt cross-attention kept
    replaced = [m for m in student.modules() if isinstance(m, module_type)]
    assert len(replaced) >= len(teacher.transformer_blocks)
    # The teacher itself is untouched.
    assert not any(isinstance(m, module_type) for m in teacher.modules())

    kw = forward_inputs(teacher)
    with torch.no_grad():
        out_t, out_s = teacher(**kw).sample, student(**kw).sample
    assert out_s.shape == out_t.shape
    assert torch.isfinite(out_s).all()


@pytest.mark.parametrize("name", CASES)
def test_save_load_gives_identical_outputs(name, tmp_path):
    student = randomize(build_model(name), seed=1)
    save_transformer(student, tmp_path / "transformer")
    loaded = load_transformer(tmp_path / "transformer")
    assert type(loaded) is type(student)
    kw = forward_inputs(student)
    with torch.no_grad():
        assert torch.equal(student(**kw).sample, loaded(**kw).sample)


def test_student_handles_non_square_latents():
    student = build_model("tiny-LiT-T2I-XL")
    kw = forward_inputs(student, height=8, width=16)
    with torch.no_grad():
        out = student(**kw).sample
    assert out.shape == (2, 8, 8, 16)


def test_fp16_student_at_2048px_token_count_stays_finite():
    """128x128 latent tokens (a 2048 px image with an f8 VAE and patch 2) in fp16."""
    student = build_model("tiny-LiT-T2I-XL").half()
    kw = forward_inputs(student, batch=1, height=256, width=256)
    kw["hidden_states"] = kw["hidden_states"].half()
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"].half()
    with torch.no_grad():
        out = student(**kw).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_wrong_family_for_teacher_is_refused():
    with pytest.raises(LitedgeError, match="mmedit"):
        linearize(build_model("tiny-MM-EDiT-SD3.5-Medium", teacher=True), "lit")
    with pytest.raises(LitedgeError, match="SD3"):
        linearize(build_model("tiny-LiT-T2I-XL", teacher=True), "mmedit")
    with pytest.raises(LitedgeError, match="cannot linearize"):
        linearize(torch.nn.Linear(4, 4), "lit")


def test_heads_that_do_not_divide_width_are_refused():
    with pytest.raises(LitedgeError, match="does not divide the model width 64"):
        linearize(build_model("tiny-LiT-T2I-XL", teacher=True), "lit", heads=3)


def test_unknown_config_name():
    with pytest.raises(LitedgeError, match="unknown config 'LiT-XXL'"):
        get_config("LiT-XXL")
