"""The sizes a model was trained at: the manifest field, the far-size rule, the one warning line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from litedge.bundle import Manifest
from litedge.errors import LitedgeError
from litedge.runtime.info import TRAINED_AREA_RATIO, trained_size_warning

MODEL = {"family": "lit", "task": "text-to-image", "latent_channels": 16, "vae_scale_factor": 32}


def _manifest(**model) -> dict:
    return {"format": "litedge-bundle", "version": 1, "model": {**MODEL, **model},
            "target": {"name": "cpu", "format": "onnx"},
            "components": {"transformer": {"file": "transformer.onnx", "sha256": "0" * 64}}}


def test_the_manifest_field_is_read_and_checked():
    assert Manifest.from_json(_manifest(trained_sizes=[256, 512, 1024])).model["trained_sizes"] == [256, 512, 1024]
    assert "trained_sizes" not in Manifest.from_json(_manifest()).model  # optional: older bundles have none
    for bad in ([], [0], [256, "512"], 1024, [True], [20000], [256.0]):
        with pytest.raises(LitedgeError, match="model.trained_sizes") as err:
            Manifest.from_json(_manifest(trained_sizes=bad))
        assert "\n" not in str(err.value) and "non-empty list of integers, each in [1, 16384]" in str(err.value)


@pytest.mark.parametrize("height, width, far", [
    (1024, 1024, False), (256, 256, False), (512, 1024, False),  # trained, or 2x a trained area
    (1448, 1448, False),  # 2.0x 1024 px's area
    (1456, 1456, True), (2048, 2048, True),  # past 2x; 4x
    (128, 128, True), (160, 192, True),  # below 256 px by more than 2x
    (192, 192, False),  # 1.78x below 256 px
])
def test_far_means_more_than_2x_the_area_of_the_nearest_trained_size(height, width, far):
    model = {"trained_sizes": [256, 512, 1024]}
    warning = trained_size_warning(model, height, width)
    assert (warning is not None) == far
    if far:
        assert warning.startswith(f"{height}x{width} px is far from the sizes this model was trained at "
                                  "(256, 512, 1024 px)") and "\n" not in warning
    assert TRAINED_AREA_RATIO == 2.0


def test_no_trained_sizes_no_warning():
    assert trained_size_warning({}, 4096, 4096) is None


def test_the_pipeline_warns_once_per_size(pixart_bundle, caplog):
    from litedge.runtime import Pipeline

    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")  # tiny PixArt: trained at its native 64 px
    assert pipe.manifest.model["trained_sizes"] == [64]
    with caplog.at_level(logging.WARNING, logger="litedge"):
        pipe("a cat", steps=1, progress=False)  # the default size: native 64x64
        assert not caplog.records
        for _ in range(2):
            pipe("a cat", height=128, width=192, steps=1, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["128x192 px is far from the sizes this model was trained at (64 px): expect repeated or "
                        "broken content; use a size within 2x the area of one of those for its best images"]


def test_lit_info_shows_the_trained_sizes(tmp_path, pixart_bundle, capsys):
    import json
    import shutil

    from litedge.cli.info import main

    copy = Path(shutil.copytree(pixart_bundle, tmp_path / "b.litedge"))
    data = json.loads((copy / "manifest.json").read_text())
    data["model"]["trained_sizes"] = [64, 128, 256]
    (copy / "manifest.json").write_text(json.dumps(data))
    assert main([str(copy)]) == 0
    assert "native size 64x64 px; trained at 64, 128, 256 px" in capsys.readouterr().out
    data["model"]["native_size"] = 128  # a declared native size wins over sample_size x factor
    (copy / "manifest.json").write_text(json.dumps(data))
    assert main([str(copy)]) == 0
    assert "native size 128x128 px; trained at 64, 128, 256 px" in capsys.readouterr().out
    del data["model"]["trained_sizes"], data["model"]["native_size"]
    (copy / "manifest.json").write_text(json.dumps(data))
    assert main([str(copy)]) == 0
    assert "native size 64x64 px (trained sizes not recorded)" in capsys.readouterr().out
