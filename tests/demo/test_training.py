"""The demo's training loop settings: the learning-rate schedule."""

import math

from litedge.demo.training import LoopConfig


def _loop(**kw) -> LoopConfig:
    base = dict(steps=1000, lr=1e-3, warmup=100, ema=0.999, save_every=100, resume=False, device="cpu", desc="t")
    return LoopConfig(**{**base, **kw})


def test_warmup_then_cosine_to_the_final_fraction():
    loop = _loop(final_lr=0.1)
    assert math.isclose(loop.lr_at(0), 1e-5) and math.isclose(loop.lr_at(99), 1e-3)
    assert math.isclose(loop.lr_at(100), 1e-3)
    mid = 100 + (1000 - 100 - 1) / 2  # halfway through the cosine: the mean of peak and floor
    assert math.isclose(loop.lr_at(int(mid)), 1e-3 * (0.1 + 0.9 * 0.5), rel_tol=2e-3)
    assert math.isclose(loop.lr_at(999), 1e-4)
    rates = [loop.lr_at(s) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises after warm-up


def test_constant_by_default_and_past_the_end():
    loop = _loop()
    assert all(math.isclose(loop.lr_at(s), 1e-3) for s in (100, 500, 999, 5000))
    assert math.isclose(_loop(final_lr=0.1).lr_at(5000), 1e-4)  # a step past the schedule stays at the floor
