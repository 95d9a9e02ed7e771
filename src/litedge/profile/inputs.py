"""Synthetic inputs for timing a bundle component, built from its manifest specs (torch-free).

Latency does not depend on the values, only on shapes and dtypes, so each input is filled
by name: latents and embeddings with standard normal noise, masks with ones, token ids
and class labels with small valid integers, the timestep with a mid-schedule value.
"""

from __future__ import annotations

import numpy as np

from litedge.bundle import Component


def _dim(dim: int | str, sizes: dict[str, int], name: str) -> int:
    if isinstance(dim, int):
        return dim
    if dim not in sizes:
        raise KeyError(f"input {name!r} has a symbolic dimension {dim!r} the profiler does not know")
    return sizes[dim]


def _fill(name: str, dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        if "mask" in name:
            return np.ones(shape, dtype)
        # Token ids 0/1 exist in every vocabulary (latency does not depend on which ids).
        high = 2 if "ids" in name else 1
        return rng.integers(0, high, size=shape).astype(dtype)
    if name == "timestep":
        return np.full(shape, 500.0, dtype)
    return rng.standard_normal(shape).astype(dtype)


def synthetic_feed(component: Component, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """One input dict for ``component``.

    Args:
        component: the manifest entry (its ``inputs``: name -> {"dtype", "shape"}).
        sizes: values of the symbolic dimensions, e.g. ``{"batch": 2, "height": 128,
            "width": 128, "text_length": 300}`` (latent height/width).
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for name, spec in component.inputs.items():
        shape = tuple(_dim(d, sizes, name) for d in spec["shape"])
        feed[name] = _fill(name, np.dtype(spec["dtype"]), shape, rng)
    return feed
