"""Decoded arrays -> PIL images -> PNG files that say how they were made.

Every image carries its generation settings (prompt, seed, steps, guidance, scheduler,
size, bundle) as JSON in ``image.info["litedge"]``; :func:`save_png` writes that into a
PNG text chunk, through a temporary file renamed into place (no partial PNG is ever left
at the path), and reads the file back to check it::

    path = save_png(images[0], "out.png")
    read_metadata(path)["seed"]   # 0
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from litedge.errors import LitedgeError

METADATA_KEY = "litedge"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' image processor rounds."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)  # (B, 3, H, W) in [0, 1]
    return (pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (B, H, W, 3)


def to_pil(images: np.ndarray, metadata: list[dict]) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images, ``metadata[i]`` in ``info["litedge"]`` as JSON."""
    out = []
    for pixels, meta in zip(to_uint8(images), metadata):
        image = Image.fromarray(pixels, mode="RGB")
        image.info[METADATA_KEY] = json.dumps(meta, ensure_ascii=False)
        out.append(image)
    return out


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, before minutes of compute, if ``path`` cannot be written as a PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise LitedgeError(f"{path}: output must be a .png file; name it e.g. {path.with_suffix('.png').name}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise LitedgeError(f"{path}: the folder {folder} does not exist; create it or choose another output path")
    if path.is_dir():
        raise LitedgeError(f"{path} is a directory; give a file name such as {path / 'image.png'}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LitedgeError(f"{path}: the folder {folder} is not writable; choose another output path")
    return path


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` with its ``info["litedge"]`` metadata to ``path`` atomically; returns the path.

    Raises:
        LitedgeError: the path is not a writable ``.png`` location.
    """
    path = check_writable(path)
    chunk = PngImagePlugin.PngInfo()
    if METADATA_KEY in image.info:
        chunk.add_itxt(METADATA_KEY, image.info[METADATA_KEY])
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise LitedgeError(f"cannot write {path} ({e.strerror}); choose another output path") from None
    finally:
        tmp.unlink(missing_ok=True)
    with Image.open(path) as back:  # reload and check what was written (STYLE habit 11)
        if back.size != image.size or back.info.get(METADATA_KEY) != image.info.get(METADATA_KEY):
            raise LitedgeError(f"{path}: the written PNG does not read back as written; the disk may be full")
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The generation settings stored in a PNG written by :func:`save_png` ({} if none)."""
    with Image.open(path) as image:
        text = image.info.get(METADATA_KEY)
    return json.loads(text) if text else {}
