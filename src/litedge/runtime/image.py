"""Decoded arrays -> PIL images -> PNG files that say how they were made.

Every image carries its generation settings (prompt, seed, steps, guidance, scheduler,
size, bundle) as JSON in ``image.info["litedge"]``; :func:`save_png` writes that into a
PNG text chunk, through a temporary file renamed into place (no partial PNG is ever left
at the path), and reads the file back to check it::

    path = save_png(images[0], "out.png")
    read_metadata(path)["seed"]   # 0

Beside the litedge JSON (an iTXt chunk), :func:`png_info` writes the ``parameters`` text chunk
that image UIs (AUTOMATIC1111, Forge, ComfyUI's loaders, civitai) read::

    a red fox in the snow
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 4.5, Seed: 0, Size: 1024x1024, Model: lit-t2i

(tEXt when the text is Latin-1, else iTXt, as Pillow picks). :func:`read_metadata` reads the
litedge JSON, or parses ``parameters`` (:func:`parse_parameters`) in a PNG that has only that.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from litedge.errors import LitedgeError
from litedge.safe_write import check_target, write_file

METADATA_KEY = "litedge"
PARAMETERS_KEY = "parameters"
_PARAM = re.compile(r'\s*([\w][\w \-/()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # key: value, or key: "quoted"


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
    check_target(path, "PNG")  # litedge.safe_write: an existing device, FIFO or symlink is never replaced
    return path


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` with its ``info["litedge"]`` metadata to ``path`` atomically; returns the path.

    Raises:
        LitedgeError: the path is not a writable ``.png`` location.
    """
    path = check_writable(path)
    chunk = png_info(image)
    write_file(path, lambda f: image.save(f, format="PNG", pnginfo=chunk), what="PNG")  # litedge.safe_write
    with Image.open(path) as back:  # reload and check what was written (STYLE habit 11)
        if back.size != image.size or back.info.get(METADATA_KEY) != image.info.get(METADATA_KEY):
            raise LitedgeError(f"{path}: the written PNG does not read back as written; the disk may be full")
    return path


def png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of ``image``: its litedge JSON (iTXt) and the ``parameters`` text made from it
    (or the ``parameters`` it already carries, e.g. when re-saving a PNG an image UI wrote)."""
    chunks = PngImagePlugin.PngInfo()
    meta = image.info.get(METADATA_KEY)
    if meta is not None:
        chunks.add_itxt(METADATA_KEY, meta)
    params = image.info.get(PARAMETERS_KEY) or (format_parameters(json.loads(meta)) if meta else None)
    if params:
        chunks.add_text(PARAMETERS_KEY, params)  # Pillow writes iTXt instead when it is not Latin-1
    return chunks


def _quote(value) -> str:
    """A value as the image UIs write it: JSON-quoted when it holds a separator."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def format_parameters(meta: dict) -> str:
    """litedge settings (``info["litedge"]``) -> the ``parameters`` text: prompt, ``Negative prompt:``
    line (when there is one), then ``Steps: N, Sampler: NAME, CFG scale: X, Seed: S, Size: WxH, Model: NAME``."""
    lines = [str(meta.get("prompt", f"class {meta['class_id']}" if "class_id" in meta else ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = {"Steps": meta.get("steps"), "Sampler": meta.get("sampler", meta.get("scheduler")),
              "CFG scale": meta.get("guidance_scale"), "Seed": meta.get("seed"),
              "Size": f"{meta['width']}x{meta['height']}" if "width" in meta and "height" in meta else None,
              "Model": str(meta["bundle"]).removesuffix(".litedge") if meta.get("bundle") else None}
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """An image UI's ``parameters`` text -> settings with litedge's keys (``prompt``, ``negative_prompt``,
    ``steps``, ``sampler`` and ``scheduler`` when litedge has it, ``guidance_scale``, ``seed``, ``width``,
    ``height``, ``model``); other fields keep their own names, as strings; ``parameters`` holds the text."""
    lines = text.strip("\n").split("\n")
    params = lines.pop() if lines and len(_PARAM.findall(lines[-1])) >= 3 else ""
    neg = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    out: dict = {"prompt": "\n".join(lines[:neg]).strip(), "parameters": text}
    if neg < len(lines):
        out["negative_prompt"] = "\n".join(lines[neg:])[len("Negative prompt:"):].strip()
    for key, value in _PARAM.findall(params):
        key, value = key.strip(), value.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out.update(_litedge_field(key, value))
    return out


def _litedge_field(key: str, value: str) -> dict:
    """One ``parameters`` field under litedge's key(s) and type (the UI's own name and text when unknown)."""
    from litedge.runtime.schedulers import scheduler_for_sampler

    try:
        if key == "Steps":
            return {"steps": int(value)}
        if key == "CFG scale":
            return {"guidance_scale": float(value)}
        if key == "Seed":
            return {"seed": int(value)}
        if key == "Size" and re.fullmatch(r"\d+x\d+", value):
            width, height = value.split("x")
            return {"width": int(width), "height": int(height)}
    except ValueError:
        return {key: value}
    if key == "Sampler":
        name = scheduler_for_sampler(value)
        return {"sampler": value, **({"scheduler": name} if name else {})}
    if key == "Model":
        return {"model": value}
    return {key: value}


def read_metadata(path: str | os.PathLike) -> dict:
    """The generation settings stored in a PNG: the litedge JSON written by :func:`save_png`, else its
    ``parameters`` text parsed (:func:`parse_parameters`), else {}."""
    with Image.open(path) as image:
        text, params = image.info.get(METADATA_KEY), image.info.get(PARAMETERS_KEY)
    if text:
        return json.loads(text)
    return parse_parameters(params) if params else {}
