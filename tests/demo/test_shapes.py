"""The shapes dataset (litedge.demo.shapes) and its scorer (litedge.demo.shapes_eval)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from litedge.demo import shapes
from litedge.demo.shapes import (
    CATEGORIES, GAP, MARGIN, Scene, eval_prompts, make_dataset, parse_caption, render, sample_scene, split_of,
    write_dataset,
)
from litedge.demo.shapes_eval import ShapesEval
from litedge.errors import LitedgeError

N_EVAL = 300


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return eval_prompts(N_EVAL, seed=0)


@pytest.fixture(scope="module")
def images(scenes) -> list[Image.Image]:
    return [render(s) for s in scenes]


@pytest.fixture(scope="module")
def judge() -> ShapesEval:
    return ShapesEval()


def _degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0, noise: float = 0, jpeg: int | None = None):
    """Gaussian blur (px), additive Gaussian noise (sigma, of 255), then JPEG at ``jpeg`` quality."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (*image.size[::-1], 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=jpeg)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


# ----------------------------------------------------------------------------- generator


def test_same_seed_same_pixels_and_prefix_stable():
    a, b = make_dataset(12, seed=7), make_dataset(12, seed=7)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) and s == t for (x, s), (y, t) in zip(a, b))
    longer = make_dataset(15, seed=7)
    assert [s for _, s in longer[:12]] == [s for _, s in a]
    other = make_dataset(12, seed=8)
    assert [s for _, s in other] != [s for _, s in a]


def test_every_category_appears_balanced(scenes):
    counts = {c: sum(s.category == c for s in scenes) for c in CATEGORIES}
    assert counts == {c: N_EVAL // len(CATEGORIES) for c in CATEGORIES}
    rng = np.random.default_rng(0)
    assert {sample_scene(rng).category for _ in range(200)} == set(CATEGORIES)


def test_caption_round_trip_and_category_from_text():
    for category in CATEGORIES:
        for spec in shapes._all_specs(category):
            assert parse_caption(shapes.caption_of(spec)) == spec
    assert parse_caption("Two red circles.").objects[0].count == 2
    bad_captions = ("a pink circle", "two red circle", "a red circle and a red circle",
                    "a red hexagon above a blue square")
    for bad in bad_captions:
        with pytest.raises(LitedgeError):
            parse_caption(bad)


def test_layout_margin_no_overlap_and_relation(scenes):
    for scene in scenes:
        spec = parse_caption(scene.caption)
        assert scene.category == spec.category
        assert sorted((o.colour, o.shape) for o in scene.objects) == sorted(
            (o.colour, o.shape) for o in spec.objects for _ in range(o.count))
        for o in scene.objects:
            assert MARGIN - 1e-3 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= 1 - MARGIN + 1e-3
            assert MARGIN - 1e-3 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= 1 - MARGIN + 1e-3
        for a, b in itertools.combinations(scene.objects, 2):
            reach = (a.size + b.size) / 2 + GAP - 1e-3
            assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
        if spec.relation:
            boxes = [(o.cx, o.cy, o.size) for o in scene.objects]
            assert shapes._relation_holds(*boxes, spec.relation)
            flipped = {"to the left of": "to the right of", "above": "below"}
            opposite = flipped.get(spec.relation) or {v: k for k, v in flipped.items()}[spec.relation]
            assert not shapes._relation_holds(*boxes, opposite)


def test_render_sizes_and_background():
    scene = sample_scene(np.random.default_rng(3), "counting")
    for size in (32, 64, 128):
        pixels = np.asarray(render(scene, size))
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        assert (pixels[0] == shapes.BACKGROUND).all()  # the margin is background


def test_train_and_eval_are_disjoint():
    train = shapes._scenes(2000, 0, "train")
    evals = eval_prompts(500, 0)
    train_captions = {s.caption for s in train}
    train_layouts = {s.objects for s in train}
    for scene in evals:  # every category holds captions out: no eval prompt is a training caption
        assert scene.objects not in train_layouts
        assert split_of(scene.caption) == "eval" and scene.caption not in train_captions
    assert all(split_of(s.caption) == "train" for s in train)
    assert {s.category for s in evals} == set(CATEGORIES)


def test_tuning_prompts_are_training_captions_in_new_layouts():
    tune = shapes.tuning_prompts(500, 0)
    train_layouts = {s.objects for s in shapes._scenes(2000, 0, "train")}
    assert all(split_of(s.caption) == "train" for s in tune)  # never an evaluation caption
    assert not any(s.objects in train_layouts for s in tune)
    assert [s.category for s in tune[:5]] == list(CATEGORIES)


def test_every_word_of_the_eval_prompts_occurs_in_training():
    train_words = {w for s in shapes._scenes(2000, 0, "train") for w in s.caption.split()}
    eval_words = {w for s in eval_prompts(500, 0) for w in s.caption.split()}
    assert eval_words <= train_words


def test_held_out_caption_counts():
    for category, expected in zip(CATEGORIES, (6, 8, 18, 36, 244)):
        captions = {shapes.caption_of(s) for s in shapes._all_specs(category)}
        assert sum(split_of(c) == "eval" for c in captions) == expected, category


def test_write_dataset_and_cli(tmp_path, capsys):
    out = write_dataset(tmp_path / "a", n=6, seed=1, size=32)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"{i:06d}.png" for i in range(6)]
    for row, (image, scene) in zip(rows, make_dataset(6, seed=1, size=32)):
        stem = row["file"][:-4]
        assert (out / f"{stem}.txt").read_text().strip() == row["caption"] == scene.caption
        assert np.array_equal(np.asarray(Image.open(out / row["file"])), np.asarray(image))
        assert [shapes.ShapeSpec(**o) for o in row["objects"]] == list(scene.objects)
    assert shapes.main(["--out", str(tmp_path / "b"), "--n", "3", "--seed", "1"]) == 0
    assert len(list((tmp_path / "b").glob("*.png"))) == 3


# ----------------------------------------------------------------------------- scorer


def test_ground_truth_scores_one(judge, scenes, images):
    result = judge.evaluate(images, [s.caption for s in scenes])
    assert result["overall"] == 1.0 and set(result["per_category"]) == set(CATEGORIES)
    assert result["per_category"] == {c: 1.0 for c in CATEGORIES}


@pytest.mark.parametrize("degradation", [dict(blur=1.0, noise=8), dict(jpeg=60), dict(blur=1.0, noise=8, jpeg=75)])
def test_degraded_ground_truth_still_scores(judge, scenes, images, degradation):
    rng, half = np.random.default_rng(0), N_EVAL // 2  # still balanced: categories cycle
    degraded = [_degrade(image, rng, **degradation) for image in images[:half]]
    result = judge.evaluate(degraded, [s.caption for s in scenes[:half]])
    assert result["overall"] >= 0.95, result
    assert min(result["per_category"].values()) >= 0.9, result


def test_other_resolutions_and_array_input(judge):
    for size in (32, 128):
        scenes = eval_prompts(50, seed=1)
        result = judge.evaluate([render(s, size) for s in scenes], [s.caption for s in scenes])
        assert result["overall"] >= 0.95, (size, result)
    scene = scenes[0]
    pixels = np.asarray(render(scene))
    assert judge.score(pixels, scene.caption)["passed"]
    assert judge.score(pixels / 255.0, scene.caption)["passed"]
    with pytest.raises(LitedgeError):
        judge.score(pixels[..., 0], scene.caption)


def test_swapped_colours_fail(judge, scenes):
    binding = [s for s in scenes if s.category == "colours"]
    for scene in binding:
        a, b = scene.objects
        swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
        result = judge.score(render(Scene(swapped, scene.caption, scene.category)), scene.caption)
        assert not result["passed"] and not any(result["checks"].values())


def test_mirrored_position_fails(judge, scenes, images):
    for scene, image in zip(scenes, images):
        if scene.category == "position":
            horizontal = "left" in scene.caption or "right" in scene.caption
            flipped = ImageOps.mirror(image) if horizontal else ImageOps.flip(image)
            checks = judge.score(flipped, scene.caption)["checks"]
            assert not checks[parse_caption(scene.caption).relation]
            assert sum(checks.values()) == 2  # both objects still found: only the relation fails


def test_one_copy_fewer_fails_counting(judge, scenes):
    for scene in scenes:
        if scene.category == "counting":
            fewer = Scene(scene.objects[:-1], scene.caption, scene.category)
            assert not judge.score(render(fewer), scene.caption)["passed"]


def test_extra_copy_fails_counting(judge):
    circles = tuple(shapes.ShapeSpec("circle", "red", cx, 0.5, 0.25) for cx in (0.2, 0.5, 0.8))
    scene = Scene(circles, "three red circles", "counting")
    assert judge.score(render(scene), "three red circles")["passed"]
    assert not judge.score(render(scene), "two red circles")["passed"]


def test_blank_and_shuffled_score_low(judge, scenes, images):
    captions = [s.caption for s in scenes]
    for fill in ((0, 0, 0), (128, 128, 128), (230, 30, 30)):  # black, grey, a wash of red
        assert judge.evaluate([Image.new("RGB", (64, 64), fill)] * 60, captions[:60])["overall"] == 0.0
    order = np.random.default_rng(0).permutation(len(captions))
    assert judge.evaluate(images, [captions[i] for i in order])["overall"] < 0.15


def test_shape_identity_ignores_orientation(judge, scenes, images):
    for scene, image in zip(scenes, images):
        if scene.category == "single_object":
            for turned in (ImageOps.flip(image), image.transpose(Image.Transpose.TRANSPOSE)):
                assert judge.score(turned, scene.caption)["passed"]


def test_wrong_shape_fails(judge, scenes):
    for scene in scenes:
        if scene.category == "single_object":
            (obj,) = scene.objects
            for other in set(shapes.SHAPES) - {obj.shape}:
                wrong = Scene((dataclasses.replace(obj, shape=other),), scene.caption, scene.category)
                assert not judge.score(render(wrong), scene.caption)["passed"]


def _reference_render(scene, size: int) -> np.ndarray:
    """Every object sampled over the whole image (the O(size^2) definition of ``render``)."""
    n = size * shapes.SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / n
    image = np.zeros((size, size, 3))
    for obj in scene.objects:
        mask = shapes.inside(obj.shape, centres[None, :], centres[:, None], obj.cx, obj.cy, obj.size / 2)
        cover = mask.reshape(size, shapes.SUPERSAMPLE, size, shapes.SUPERSAMPLE).mean(axis=(1, 3))
        image += cover[..., None] * np.array(shapes.COLOURS[obj.colour])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def test_render_equals_the_whole_image_definition_and_windows_are_crops(scenes):
    for scene in scenes[:20]:
        for size in (64, 200):
            full = np.asarray(render(scene, size))
            assert (full == _reference_render(scene, size)).all()
        full = np.asarray(render(scene, 512))
        for left, top in ((0, 0), (97, 301), (384, 384)):
            window = np.asarray(render(scene, 512, window=(left, top, 128, 128)))
            assert (window == full[top:top + 128, left:left + 128]).all()
        past = np.asarray(render(scene, 512, window=(-32, -32, 64, 64)))  # outside the image: background
        assert (past[:32] == 0).all() and (past[32:, 32:] == full[:32, :32]).all()
