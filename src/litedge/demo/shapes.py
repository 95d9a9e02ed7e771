"""The procedural "shapes" dataset: coloured shapes on black, with GenEval-style captions.

Every scene is a few flat-coloured circles, squares and upright triangles on a black
background, and a caption that describes it exactly. Geometry is in resolution-free units
(fractions of the image side), so one scene renders at 32, 64 (native) or 128 px.

Vocabulary
    shapes   circle, square, triangle (apex up). No diamond: three shapes keep the detector's
             margins wide (its kurtosis ratio, ~2 for a diamond, might separate one; not measured).
    colours  red, yellow, green, cyan, blue, purple: six hues about 60 degrees apart, all
             bright and saturated. Black is the background because blending with black only
             scales a colour (blur and anti-aliasing keep its hue), so the scorer can tell
             every colour from the background and from each other at any edge pixel.

Categories (each caption belongs to exactly one; ``parse_caption`` recovers it from text)
    single_object  "a red circle"                            one object
    two_objects    "a green circle and a green square"       two shapes, one shared colour:
                                                             composition without binding
    counting       "one blue triangle", "three yellow squares"  1-3 copies of one object,
                                                             and nothing else
    colours        "a purple square and a cyan circle"       two shapes, two colours:
                                                             attribute binding (swapping the
                                                             colours must fail)
    position       "a red circle to the left of a blue square"  left of / right of / above /
                                                             below; the subject's and the
                                                             reference's boxes are apart along
                                                             that axis and at most half as far
                                                             apart along the other

Train/eval disjointness (see ``split_of``)
    Training items come from ``SeedSequence(seed, spawn_key=(0, i))`` and evaluation prompts
    from ``spawn_key=(1, i)``: independent streams, so even with the same seed the layouts
    differ. Captions are held out as well, in every category, so no evaluation caption ever
    occurs in training (tested). two_objects, colours and position hold out a fixed random 20%
    of their compositions (order-free: "A and B" = "B and A", "A left of B" = "B right of A").
    single_object (18 captions) and counting (54) are small enough that a random third could
    take every caption of one word, so they hold out a Latin pattern instead: colour index
    % 3 == shape index ("a red circle", "a yellow square", ...), and (colour + shape + number)
    % 3 == 0 for counting; every colour, shape and number still occurs in training captions.
    Captions per category: 18, 36, 54, 180, 1224; held out: 6, 8, 18, 36, 244.

Example::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "position")
    image = render(scene, size=64)          # PIL.Image, RGB, 64x64
    parse_caption(scene.caption).category   # "position"
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from litedge.errors import LitedgeError

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; brightness-normalised pairwise distance >= 0.7
    "red": (230, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 200, 40),
    "cyan": (20, 205, 215),
    "blue": (30, 60, 250),
    "purple": (190, 40, 230),
}
BACKGROUND = (0, 0, 0)
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = {"one": 1, "two": 2, "three": 3}
HOLDOUT = {"single_object": 1 / 3, "two_objects": 0.2, "counting": 1 / 3, "colours": 0.2, "position": 0.2}

SIZE_RANGE = (0.22, 0.34)  # object side / diameter, fraction of the image side
MARGIN = 0.05  # free border around the image, fraction of the side
GAP = 0.06  # least distance between two objects' boxes, fraction of the side
SUPERSAMPLE = 4  # sub-pixels per pixel side: mild anti-aliasing
_MAX_TRIES = 10_000

Split = Literal["train", "eval", "any"]
_STREAMS = {"train": 0, "eval": 1, "tune": 2}


@dataclass(frozen=True)
class ShapeSpec:
    """One object. ``cx, cy``: centre of its box, ``size``: box side, all fractions of the image side (y down)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """Objects to draw and the caption that describes them. For position, objects = (subject, reference)."""

    objects: tuple[ShapeSpec, ...]
    caption: str
    category: str


@dataclass(frozen=True)
class ObjectReq:
    """A caption asks for ``count`` objects of this colour and shape (exactly that many when ``exact``)."""

    colour: str
    shape: str
    count: int = 1
    exact: bool = False


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption requires: objects, and for position captions ``relation`` between objects[0] and [1]."""

    category: str
    objects: tuple[ObjectReq, ...]
    relation: str | None = None


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(colour: str, shape: str) -> str:
    return f"{_article(colour)} {colour} {shape}"


def caption_of(spec: CaptionSpec) -> str:
    """The one caption text for a requirement (inverse of ``parse_caption``)."""
    objs = spec.objects
    if spec.category == "counting":
        word = {v: k for k, v in NUMBERS.items()}[objs[0].count]
        plural = "s" if objs[0].count > 1 else ""
        return f"{word} {objs[0].colour} {objs[0].shape}{plural}"
    phrases = [_phrase(o.colour, o.shape) for o in objs]
    if spec.category == "single_object":
        return phrases[0]
    joiner = spec.relation if spec.category == "position" else "and"
    return f"{phrases[0]} {joiner} {phrases[1]}"


def _parse_object(words: list[str], caption: str) -> ObjectReq:
    """``["a", "red", "circle"]`` -> ObjectReq; ``["two", "red", "circles"]`` -> count 2, exact."""
    if len(words) == 3 and words[1] in COLOURS:
        head, colour, shape = words
        if head in ("a", "an") and shape in SHAPES:
            return ObjectReq(colour, shape)
        if head in NUMBERS:
            count = NUMBERS[head]
            bare = shape[:-1] if count > 1 and shape.endswith("s") else shape
            if bare in SHAPES and (count > 1) == (bare != shape):
                return ObjectReq(colour, bare, count, exact=True)
    raise LitedgeError(
        f"cannot parse caption {caption!r}: expected phrases like 'a red circle' or 'two red circles' "
        f"with colours {', '.join(COLOURS)} and shapes {', '.join(SHAPES)}; fix the caption"
    )


def parse_caption(caption: str) -> CaptionSpec:
    """Read what a caption requires, from its text alone (the scorer never sees the Scene).

    Raises LitedgeError for text outside the dataset's grammar.
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for relation in RELATIONS:
        left, sep, right = text.partition(f" {relation} ")
        if sep:
            objs = (_parse_object(left.split(), caption), _parse_object(right.split(), caption))
            if not (objs[0].exact or objs[1].exact) and objs[0] != objs[1]:
                return CaptionSpec("position", objs, relation)
            raise LitedgeError(
                f"cannot parse caption {caption!r}: a relation needs two different 'a <colour> <shape>' phrases")
    left, sep, right = text.partition(" and ")
    if sep:
        objs = (_parse_object(left.split(), caption), _parse_object(right.split(), caption))
        if objs[0].exact or objs[1].exact or objs[0] == objs[1]:
            raise LitedgeError(
                f"cannot parse caption {caption!r}: 'and' joins two different 'a <colour> <shape>' phrases; "
                "for copies of one object write e.g. 'two red circles'")
        category = "two_objects" if objs[0].colour == objs[1].colour else "colours"
        return CaptionSpec(category, objs)
    obj = _parse_object(text.split(), caption)
    return CaptionSpec("counting" if obj.exact else "single_object", (obj,))


# ----------------------------------------------------------------------------- train/eval split


def _canonical_key(spec: CaptionSpec) -> str:
    """The composition a caption names, independent of word order and of relation direction."""
    objs = [(o.colour, o.shape, o.count) for o in spec.objects]
    if spec.category == "position":
        flipped = {"to the right of": "to the left of", "below": "above"}
        if spec.relation in flipped:
            return f"position|{objs[1]}|{flipped[spec.relation]}|{objs[0]}"
        return f"position|{objs[0]}|{spec.relation}|{objs[1]}"
    return f"{spec.category}|{sorted(objs)}"


def _all_specs(category: str) -> list[CaptionSpec]:
    """Every caption of a category (single 18, two_objects 36, counting 54, colours 180, position 1224)."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    if category == "single_object":
        return [CaptionSpec(category, (ObjectReq(c, s),)) for c, s in pairs]
    if category == "counting":
        return [CaptionSpec(category, (ObjectReq(c, s, n, True),)) for n in NUMBERS.values() for c, s in pairs]
    specs = []
    for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2):
        objs = (ObjectReq(c1, s1), ObjectReq(c2, s2))
        if category == "position":
            specs += [CaptionSpec(category, objs, r) for r in RELATIONS]
        elif s1 != s2 and (c1 == c2) == (category == "two_objects"):
            specs.append(CaptionSpec(category, objs))
    return specs


def _latin_held_out(spec: CaptionSpec) -> bool:
    """single_object / counting: a third of the captions, chosen so that no word leaves training."""
    (obj,) = spec.objects
    colour, shape = list(COLOURS).index(obj.colour), SHAPES.index(obj.shape)
    if spec.category == "single_object":
        return colour % 3 == shape
    return (colour + shape + obj.count) % 3 == 0


@functools.cache
def _held_out_keys() -> frozenset[str]:
    """The compositions reserved for evaluation: a fixed HOLDOUT fraction of each category."""
    held = []
    for category in CATEGORIES:
        if category in ("single_object", "counting"):
            held += [_canonical_key(s) for s in _all_specs(category) if _latin_held_out(s)]
            continue
        keys = sorted({_canonical_key(s) for s in _all_specs(category)})
        order = np.random.default_rng(20240601).permutation(len(keys))
        held += [keys[i] for i in order[: round(HOLDOUT[category] * len(keys))]]
    return frozenset(held)


def split_of(caption: str) -> Literal["train", "eval"]:
    """``"eval"`` if the caption's composition is held out of training, else ``"train"``."""
    return "eval" if _canonical_key(parse_caption(caption)) in _held_out_keys() else "train"


# ----------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, items, k: int = 1) -> list[str]:
    """``k`` distinct items, as plain str (numpy's str_ would leak into captions and keys)."""
    return [items[i] for i in rng.permutation(len(items))[:k]]


def _sample_spec(rng: np.random.Generator, category: str) -> CaptionSpec:
    """A random caption requirement of one category (uniform over its objects, not its captions)."""
    c1, c2 = _pick(rng, list(COLOURS), 2)
    s1, s2 = _pick(rng, SHAPES, 2)
    if category == "single_object":
        return CaptionSpec(category, (ObjectReq(c1, s1),))
    if category == "counting":
        return CaptionSpec(category, (ObjectReq(c1, s1, int(rng.integers(1, 4)), True),))
    if category == "two_objects":
        return CaptionSpec(category, (ObjectReq(c1, s1), ObjectReq(c1, s2)))
    if category == "colours":
        return CaptionSpec(category, (ObjectReq(c1, s1), ObjectReq(c2, s2)))
    (s2,) = _pick(rng, SHAPES)  # position: any two different objects
    c2 = c2 if s2 == s1 else _pick(rng, list(COLOURS))[0]
    return CaptionSpec(category, (ObjectReq(c1, s1), ObjectReq(c2, s2)), _pick(rng, RELATIONS)[0])


def _relation_holds(a: tuple, b: tuple, relation: str) -> bool:
    """Layout rule for position scenes: boxes apart along the axis, off-axis offset <= half of it."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    along = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    across = abs(ay - by) if relation.startswith("to the") else abs(ax - bx)
    return along >= (asz + bsz) / 2 + GAP and across <= along / 2


def _apart(a: tuple, b: tuple) -> bool:
    """Boxes at least GAP apart along x or y."""
    reach = (a[2] + b[2]) / 2 + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _place(rng: np.random.Generator, n: int, relation: str | None) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping boxes (cx, cy, size) inside the margin; objects 0 and 1 obey ``relation``."""
    for _ in range(_MAX_TRIES):
        sizes = rng.uniform(*SIZE_RANGE, n)
        boxes = [(*rng.uniform(MARGIN + s / 2, 1 - MARGIN - s / 2, 2), s) for s in sizes]
        boxes = [tuple(round(float(v), 4) for v in box) for box in boxes]  # short, exact metadata
        if all(_apart(a, b) for a, b in itertools.combinations(boxes, 2)) and (
            relation is None or _relation_holds(boxes[0], boxes[1], relation)
        ):
            return boxes
    raise RuntimeError(f"could not place {n} objects in {_MAX_TRIES} tries; SIZE_RANGE/GAP leave no room")


def sample_scene(rng: np.random.Generator, category: str | None = None, split: Split = "any") -> Scene:
    """A random scene of ``category`` (uniform over CATEGORIES when None).

    ``split``: ``"train"`` keeps captions whose ``split_of`` is "train"; ``"eval"`` keeps held-out
    captions, or any caption in a category that holds none out (HOLDOUT 0); ``"any"`` keeps all.
    """
    if category is None:
        (category,) = _pick(rng, CATEGORIES)
    if category not in CATEGORIES:
        raise LitedgeError(f"unknown category {category!r}: expected one of {', '.join(CATEGORIES)}")
    for _ in range(_MAX_TRIES):
        spec = _sample_spec(rng, category)
        caption = caption_of(spec)
        if split == "any" or split_of(caption) == split or (split == "eval" and not HOLDOUT[category]):
            break
    else:
        raise LitedgeError(f"category {category!r} has no {split} captions; check HOLDOUT")
    reqs = [o for o in spec.objects for _ in range(o.count)]
    boxes = _place(rng, len(reqs), spec.relation)
    objects = tuple(ShapeSpec(o.shape, o.colour, *box) for o, box in zip(reqs, boxes))
    return Scene(objects, caption, category)


# ----------------------------------------------------------------------------- rendering


def inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean mask of points (x, y) inside ``shape`` whose box is centred at (cx, cy), half side ``half``.

    y points down; the triangle is isosceles, apex at the top centre, base along the bottom.
    """
    dx, dy = np.abs(x - cx), y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (dx <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        return (dy <= half) & (dx <= (dy + half) / 2)
    raise LitedgeError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 64, supersample: int = SUPERSAMPLE,
           window: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Draw a scene: RGB ``size`` x ``size`` uint8, black background, ``supersample``^2 sub-pixels per pixel.

    ``window`` = (left, top, width, height) in pixels of the ``size`` image draws only that crop
    (exactly those pixels of the full image; it may reach past the border, which stays black).
    Each object is sampled only over the pixels its box touches (the rest of its mask is empty),
    so a 1024 px scene costs about what its objects cover, not 16M sub-pixels per object.
    """
    left, top, width, height = window or (0, 0, size, size)
    image = np.zeros((height, width, 3)) + BACKGROUND
    for obj in scene.objects:
        half = obj.size / 2
        x0, x1 = _pixel_span(obj.cx, half, size, left, width)
        y0, y1 = _pixel_span(obj.cy, half, size, top, height)
        if x0 >= x1 or y0 >= y1:
            continue
        n = size * supersample
        xs = (np.arange(x0 * supersample, x1 * supersample) + 0.5) / n  # sub-pixel centres, fraction of the side
        ys = (np.arange(y0 * supersample, y1 * supersample) + 0.5) / n
        mask = inside(obj.shape, xs[None, :], ys[:, None], obj.cx, obj.cy, half)
        cover = mask.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
        image[y0 - top:y1 - top, x0 - left:x1 - left] += cover[..., None] * (np.array(COLOURS[obj.colour]) - BACKGROUND)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def _pixel_span(centre: float, half: float, size: int, start: int, length: int) -> tuple[int, int]:
    """Pixels [lo, hi) of [start, start + length) that centre +- half (fractions of the side) touches, +1 slack."""
    lo = max(int(np.floor((centre - half) * size)) - 1, 0, start)
    return lo, min(int(np.ceil((centre + half) * size)) + 1, size, start + length)


# ----------------------------------------------------------------------------- datasets


def _scenes(n: int, seed: int, stream: Literal["train", "eval", "tune"]) -> list[Scene]:
    """Item i uses its own stream SeedSequence(seed, spawn_key=(stream, i)); categories cycle.

    The "tune" stream draws training captions (new layouts of them), never evaluation ones.
    """
    split = "train" if stream == "tune" else stream
    scenes = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAMS[stream], i)))
        scenes.append(sample_scene(rng, CATEGORIES[i % len(CATEGORIES)], split))
    return scenes


def make_dataset(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, Scene]]:
    """``n`` training (image, scene) pairs, balanced over CATEGORIES, a deterministic function of ``seed``.

    Item i does not depend on ``n``: a longer dataset extends a shorter one.
    """
    return [(render(scene, size), scene) for scene in _scenes(n, seed, "train")]


def training_scenes(n: int, seed: int) -> list[Scene]:
    """The scenes of :func:`make_dataset` (same order), to render at any size."""
    return _scenes(n, seed, "train")


def eval_prompts(n: int, seed: int) -> list[Scene]:
    """``n`` evaluation scenes, balanced over CATEGORIES, disjoint from training (module docstring)."""
    return _scenes(n, seed, "eval")


def tuning_prompts(n: int, seed: int) -> list[Scene]:
    """``n`` scenes with training captions, balanced over CATEGORIES, for choosing sampling settings
    (guidance, steps) without looking at the evaluation prompts; their layouts are not training items'."""
    return _scenes(n, seed, "tune")


def write_dataset(out_dir: str | Path, n: int, seed: int, size: int = 64) -> Path:
    """Write ``NNNNNN.png`` + ``NNNNNN.txt`` (caption) per item and ``metadata.jsonl``; returns ``out_dir``.

    metadata.jsonl has one JSON object per line: file, caption, category, objects (ShapeSpec fields).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, scene) in enumerate(make_dataset(n, seed, size)):
        stem = f"{i:06d}"
        image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(scene.caption + "\n")
        rows.append({"file": f"{stem}.png", "caption": scene.caption, "category": scene.category,
                     "objects": [asdict(o) for o in scene.objects]})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m litedge.demo.shapes", description="Write the shapes dataset.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (32, 64, 128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = write_dataset(args.out, args.n, args.seed, args.size)
    print(f"wrote {args.n} images and captions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
