"""Tiny bundles for the runtime benchmarks, built once into a cache folder (needs torch)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_lit_bundle(cache: Path) -> Path:
    """The tests' tiny LiT (linear attention) text-to-image bundle, 8x VAE without mid attention."""
    bundle = cache / "lit.litedge"
    if not (bundle / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT))
        from tests.runtime.fixtures import export, make_tiny_pixart_pipeline

        pipeline = make_tiny_pixart_pipeline(cache / "lit-pipeline", linear=True, mid_attention=False)
        export(pipeline, bundle)
    return bundle
