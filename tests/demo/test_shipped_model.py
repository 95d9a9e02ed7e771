"""The shipped demo model: intact, within the repository's 25 MB, and the README's first command works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from litedge.bundle import verify_bundle
from litedge.cli.generate import main as generate
from litedge.demo import DEMO_BUNDLE, MODEL_DIR
from litedge.demo.build import SHIP_LIMIT_BYTES
from litedge.demo.shapes_eval import ShapesEval
from litedge.models.loading import load_model

README = Path(__file__).resolve().parents[2] / "README.md"
PROMPT = "a red circle to the left of a blue square"


def test_shipped_files_are_intact_and_small():
    manifest = verify_bundle(DEMO_BUNDLE)  # every file's sha256 against the manifest
    assert manifest.target["name"] == "cpu" and manifest.target["weights"].startswith("int4")
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total <= SHIP_LIMIT_BYTES, f"{total / 2**20:.1f} MB shipped"


def test_readme_first_command_is_the_bare_prompt():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert f'lit-generate "{PROMPT}" -o demo.png' in first_block
    assert first_block.strip().endswith(f'lit-generate "{PROMPT}" -o demo.png')  # no other argument


def _first_command_image(tmp_path: Path) -> np.ndarray:
    out = tmp_path / "demo.png"
    assert generate([PROMPT, "-o", str(out), "--quiet"]) == 0  # no --bundle: the shipped model
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]
    return np.asarray(Image.open(out).convert("RGB"))


def test_readme_first_command_writes_an_image(tmp_path):
    image = _first_command_image(tmp_path)
    assert image.shape == (64, 64, 3)
    assert ShapesEval().detect(image), "no object drawn at all"


@pytest.mark.xfail(strict=True, reason="issue 7: the shipped LiT student int4 (distilled 14k steps on 2 CPU cores) "
                   "scores 0.62 on ShapesEval but only 0.34 on colour binding and 0.18 on position, and draws this prompt "
                   "with the colours swapped (a red square, a blue circle); when a model that draws it is shipped this "
                   "test passes and strict xfail fails, so this marker must go")
def test_readme_first_command_draws_what_it_says(tmp_path):
    image = _first_command_image(tmp_path)
    verdict = ShapesEval().score(image, PROMPT)
    assert verdict["passed"], json.dumps(verdict, default=str)


def test_shipped_pipeline_loads_through_the_user_loader():
    loaded = load_model(MODEL_DIR / "shapes-lit")  # what lit-export and lit-distill read
    assert loaded.family == "lit" and loaded.kind == "pixart"
    assert loaded.transformer.config.sample_size * 4 == 64  # f4 VAE: 16x16 latents, 64 px
