"""Cost is linear in the token count for every linear variant, quadratic for softmax.

Ratios are measured side by side in one run (back to back, median over repeats) at a fixed
width; the thresholds are far from the expected values (4x for linear, 16x for softmax)
so a loaded machine does not flip the verdict.
"""

import time

import pytest
import torch
from diffusers.models.attention_processor import Attention

from litedge.models.edit_attention import EDiTAttention, MMEDiTJointAttention
from litedge.models.linear_attention import LiTAttention
from tests.models.test_attention import _sd3_joint_attention

WIDTH, HEADS, SMALL, LARGE = 64, 4, (64, 64), (128, 128)  # 4x the tokens


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ratio(make_call, repeats: int = 7) -> float:
    """Median over repeats of time(large) / time(small), the two measured back to back so
    that a change in machine load affects both sides of each ratio alike."""
    small, large = make_call(SMALL), make_call(LARGE)
    with torch.no_grad():
        small(), large()  # warm-up
        ratios = sorted(_once(large) / _once(small) for _ in range(repeats))
    return ratios[len(ratios) // 2]


def _call(module, grid, kind):
    torch.manual_seed(0)
    x = torch.randn(1, grid[0] * grid[1], WIDTH)
    if kind == "softmax":
        return lambda: module(x)
    if kind == "joint":
        context = torch.randn(1, 16, WIDTH)
        return lambda: module(x, context, grid=grid)
    return lambda: module(x, grid=grid)


@pytest.fixture(scope="module")
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_linear_variants_scale_linearly_softmax_quadratically(threads):
    modules = {
        "softmax": (Attention(WIDTH, heads=HEADS, dim_head=WIDTH // HEADS, bias=True).eval(), "softmax"),
        "lit": (LiTAttention(WIDTH, heads=2).eval(), "grid"),
        "edit": (EDiTAttention(WIDTH, heads=HEADS).eval(), "grid"),
        "mmedit": (MMEDiTJointAttention(_sd3_joint_attention(WIDTH, HEADS)).eval(), "joint"),
    }
    ratios = {name: _ratio(lambda g, m=m, k=k: _call(m, g, k)) for name, (m, k) in modules.items()}
    print("time(4x tokens) / time(1x tokens):", {k: round(v, 2) for k, v in ratios.items()})
    assert ratios["softmax"] > 8, ratios
    for name in ("lit", "edit", "mmedit"):
        assert ratios[name] < 8, ratios
