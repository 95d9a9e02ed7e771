"""Each linear attention against its naive O(N^2) reference, on a non-square grid."""

import pytest
import torch

from litedge.models.edit_attention import EDiTAttention, MMEDiTJointAttention
from litedge.models.linear_attention import LiTAttention, linear_attention, relu_kernel
from litedge.models.reference import edit_reference, lit_reference, mmedit_reference

GRID = (24, 40)  # non-square: H != W catches transposed reshapes
BATCH, WIDTH = 2, 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tokens() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, GRID[0] * GRID[1], WIDTH)


def test_lit_matches_quadratic_reference(tokens):
    torch.manual_seed(1)
    attn = LiTAttention(WIDTH, heads=2).eval()
    with torch.no_grad():
        out = attn(tokens, grid=GRID)
    assert out.shape == tokens.shape
    assert rel_err(out, lit_reference(attn, tokens, GRID)) < 1e-5


def test_lit_dwc_sees_the_grid_layout(tokens):
    """Swapping H and W must change the output: the conv really works on the 2-D grid."""
    torch.manual_seed(1)
    attn = LiTAttention(WIDTH, heads=2).eval()
    with torch.no_grad():
        assert rel_err(attn(tokens, grid=GRID[::-1]), attn(tokens, grid=GRID)) > 1e-3


def test_edit_matches_quadratic_reference(tokens):
    torch.manual_seed(2)
    attn = EDiTAttention(WIDTH, heads=4).eval()
    with torch.no_grad():
        out = attn(tokens, grid=GRID)
        q, k, v = attn.project(tokens, GRID)
    assert out.shape == tokens.shape
    assert k.shape[-2] == (GRID[0] // 2) * (GRID[1] // 2)  # 4x fewer keys/values
    assert rel_err(out, edit_reference(attn, tokens, GRID)) < 1e-5


def _sd3_joint_attention(dim: int = WIDTH, heads: int = 4, context_pre_only: bool = False):
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    return Attention(
        query_dim=dim, added_kv_proj_dim=dim, dim_head=dim // heads, heads=heads, out_dim=dim,
        context_pre_only=context_pre_only, bias=True, processor=JointAttnProcessor2_0(),
        qk_norm="rms_norm", eps=1e-6,
    )


@pytest.mark.parametrize("eta", ["token-ratio", "exact"])
@pytest.mark.parametrize("context_pre_only", [False, True])
def test_mmedit_matches_quadratic_reference(tokens, eta, context_pre_only):
    torch.manual_seed(3)
    teacher = _sd3_joint_attention(context_pre_only=context_pre_only)
    for norm in (teacher.norm_q, teacher.norm_k, teacher.norm_added_q, teacher.norm_added_k):
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)  # not the identity, so a skipped norm shows
    attn = MMEDiTJointAttention(teacher, eta=eta).eval()
    context = torch.randn(BATCH, 7, WIDTH)
    with torch.no_grad():
        img, txt = attn(tokens, context, grid=GRID)
    ref_img, ref_txt = mmedit_reference(attn, tokens, context, GRID)
    assert img.shape == tokens.shape and txt.shape == context.shape
    assert rel_err(img, ref_img) < 1e-5
    assert rel_err(txt, ref_txt) < 1e-5


def test_mmedit_inherits_prompt_projections():
    teacher = _sd3_joint_attention()
    attn = MMEDiTJointAttention(teacher)
    assert attn.add_q_proj is teacher.add_q_proj and attn.to_add_out is teacher.to_add_out


def test_sums_stay_fp32_under_autocast():
    """bf16 inputs at a 2K token count: the kernel accumulates in fp32, the output is finite."""
    torch.manual_seed(4)
    q = relu_kernel(torch.randn(1, 2, 128 * 128, 32) * 30)
    k = relu_kernel(torch.randn(1, 2, 128 * 128, 32) * 30)
    v = torch.randn(1, 2, 128 * 128, 32) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    ref = linear_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 1e-2  # only the final bf16 rounding remains


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="does not divide"):
        LiTAttention(WIDTH, heads=3)
    with pytest.raises(ValueError, match="does not divide"):
        EDiTAttention(WIDTH, heads=5)


def test_missing_grid_is_a_clear_error(tokens):
    with pytest.raises(ValueError, match="latent grid"):
        LiTAttention(WIDTH, heads=2)(tokens)
