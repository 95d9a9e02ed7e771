"""Training data for distillation: discover samples, encode them once, read the cache.

Three data layouts are accepted (:func:`discover`):
- a folder of images, each with a same-stem ``.txt`` caption (``cat.png`` + ``cat.txt``);
- a JSONL file, one ``{"path": ..., "caption": ...}`` per line (paths relative to the file);
- class folders ``DATA/<class id or name>/*.png`` for class-conditional (DiT) teachers.

:func:`cache_features` encodes every image with the VAE (latents times its
``scaling_factor``, after subtracting ``shift_factor`` where the VAE has one) and every
caption with the text encoder (PixArt-style cached T5 features and attention masks) once,
into safetensors shards. Training reads only the cache (:class:`FeatureCache`). A cache is
a directory with ``cache.json`` and ``shard-*.safetensors``; each shard holds ``latents``
(N, C, h, w) and the model's conditioning under the name of its forward argument:
``encoder_hidden_states`` (N, L, D) + ``encoder_attention_mask`` (N, L) for text,
``class_labels`` (N,) for classes, ``pooled_projections`` (N, P) for SD3. A cache written
by other tools in this format can be passed as ``--data`` directly.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from litedge.atomic import make_temp_dir, recover_interrupted, replace_dir
from litedge.distill.guards import check_image_file, open_shard, read_cache_index
from litedge.errors import LitedgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_INDEX = "cache.json"
CACHE_FORMAT = "litedge-feature-cache"


@dataclass(frozen=True)
class Sample:
    """One training image and its condition: a caption, or a class id."""

    path: Path
    caption: str | None = None
    label: int | None = None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _from_jsonl(path: Path, allow_missing_captions: bool) -> list[Sample]:
    samples = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row["path"], str) or not isinstance(row.get("caption", ""), (str, type(None))):
                raise TypeError
            image = path.parent / row["path"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise LitedgeError(f'{path}:{lineno}: expected a JSON object with "path" and "caption"') from None
        caption = row.get("caption")
        if caption is None and not allow_missing_captions:
            raise LitedgeError(f"{path}:{lineno}: no caption for {row['path']}: add one or pass --allow-missing-captions")
        samples.append(Sample(image, caption or ""))
    return samples


def _read_text(path: Path) -> str:
    """A data file's text (UTF-8); one line for a file that is not text or cannot be read."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LitedgeError(f"{path}: not UTF-8 text (byte {e.start}); expected one JSON object per line") from None
    except OSError as e:
        raise LitedgeError(f"{path}: cannot read ({e.strerror})") from None


def _from_caption_folder(folder: Path, images: list[Path], allow_missing_captions: bool) -> list[Sample]:
    samples = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            caption = sidecar.read_text(errors="replace").strip()
        elif allow_missing_captions:
            caption = ""
        else:
            raise LitedgeError(f"{image} has no caption file {sidecar.name}: add it or pass --allow-missing-captions")
        samples.append(Sample(image, caption))
    return samples


def _from_class_folders(folder: Path, classes: list[Path]) -> list[Sample]:
    numeric = all(c.name.isdigit() for c in classes)
    samples = []
    for index, cls in enumerate(sorted(classes, key=lambda c: int(c.name) if numeric else c.name)):
        label = int(cls.name) if numeric else index
        samples += [Sample(image, label=label) for image in _images_in(cls)]
    return samples


def discover(data: str | os.PathLike, *, allow_missing_captions: bool = False) -> list[Sample]:
    """The samples of a caption folder, a JSONL file or class folders (see the module doc)."""
    data = Path(data)
    if not data.exists():
        raise LitedgeError(f"--data {data}: no such file or directory")
    if data.is_file():
        if data.suffix.lower() != ".jsonl":
            raise LitedgeError(f"--data {data}: expected a folder of images or a .jsonl file")
        samples = _from_jsonl(data, allow_missing_captions)
    else:
        try:
            images = _images_in(data)
            classes = [d for d in sorted(data.iterdir()) if d.is_dir() and not d.name.startswith(".") and _images_in(d)]
        except OSError as exc:
            raise LitedgeError(f"--data {data}: cannot read the folder ({exc.strerror})") from None
        if images:
            samples = _from_caption_folder(data, images, allow_missing_captions)
        else:
            samples = _from_class_folders(data, classes)
    if not samples:
        raise LitedgeError(
            f"--data {data}: no images found (expected {'/'.join(IMAGE_SUFFIXES)} files with .txt captions, "
            "class folders, or a .jsonl)"
        )
    return samples


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1]: shorter side resized to R, centre-cropped. Raises OSError/ValueError."""
    import numpy as np
    from PIL import Image

    check_image_file(path)  # litedge.distill.guards: decompression bombs and truncated files refused
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(im, dtype=np.float32)  # (R, R, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass
class CacheInfo:
    """What a cache holds; ``skipped`` lists images that failed to decode."""

    path: Path
    count: int
    resolution: int
    keys: list[str]
    skipped: list[str] = field(default_factory=list)
    source: str | None = None
    text_max_length: int | None = None
    encoders: str | None = None  # fingerprint of the VAE / text encoder that made the features


def read_cache_info(path: Path) -> CacheInfo:
    index = Path(path) / CACHE_INDEX
    meta = read_cache_index(index)  # litedge.distill.guards: one line for a damaged cache.json
    if meta.get("format") != CACHE_FORMAT:
        raise LitedgeError(f"{index}: not a litedge feature cache (format {meta.get('format')!r})")
    return CacheInfo(Path(path), meta["count"], meta["resolution"], meta["keys"], meta.get("skipped", []),
                     meta.get("source"), meta.get("text_max_length"), meta.get("encoders"))


def _encode_text(captions: list[str], text_encoder, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids, attention_mask=mask)[0]  # (B, L, D)
    return {"encoder_hidden_states": hidden.float(), "encoder_attention_mask": mask.to(torch.int64)}


def _encode_images(images: torch.Tensor, vae) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] -> (B, C, R/f, R/f) scaled latents (AutoencoderKL: the posterior mean;
    AutoencoderDC: its deterministic latent)."""
    with torch.no_grad():
        encoded = vae.encode(images.to(vae.dtype))
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def cache_features(
    data: str | os.PathLike | list[Sample],
    vae,
    text_encoder,
    tokenizer,
    out_dir: str | os.PathLike,
    resolution: int,
    *,
    text_max_length: int = 300,
    allow_missing_captions: bool = False,
    shard_size: int = 1024,
    batch_size: int = 8,
    progress: bool = False,
    source: str | None = None,
    encoders: str | None = None,
) -> CacheInfo:
    """Encode ``data`` once into safetensors shards under ``out_dir`` (written atomically).

    Args:
        data: a data path (see :func:`discover`) or its samples.
        vae: a diffusers ``AutoencoderKL``. text_encoder / tokenizer: a transformers encoder
            and its tokenizer, or None for class-conditional data.
        resolution: square image side in pixels; latents are (C, R/f, R/f).
        text_max_length: tokens per caption (PixArt-Sigma: 300), padded, with a mask.
        source: recorded in cache.json (default: ``data`` when it is a path) so a run can
            tell a cache of other data.
        encoders: recorded in cache.json, so a run can tell features of other encoders
            (see ``litedge.distill.trainer.encoders_fingerprint``).

    Returns:
        CacheInfo; images that fail to decode are skipped and listed in ``skipped``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    samples = data if isinstance(data, list) else discover(data, allow_missing_captions=allow_missing_captions)
    text = samples[0].label is None
    if text and (text_encoder is None or tokenizer is None):
        raise LitedgeError("captioned data needs the teacher's text_encoder/ and tokenizer/: pass a pipeline directory")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    tmp = make_temp_dir(out)  # .NAME.tmp-<pid>-<random>: the next run can tell it is stale
    skipped: list[str] = []
    count, shard, pending = 0, 0, []
    keys: list[str] = []

    def flush(final: bool = False) -> None:
        nonlocal shard, pending
        while pending and (final or sum(len(b["latents"]) for b in pending) >= shard_size):
            merged = {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            head = {k: v[:shard_size].contiguous() for k, v in merged.items()}
            rest = {k: v[shard_size:] for k, v in merged.items()}
            save_file(head, str(tmp / f"shard-{shard:05d}.safetensors"))
            shard += 1
            pending = [rest] if len(rest["latents"]) else []

    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="caching", disable=not progress):
            batch, pixels = [], []
            for s in samples[start:start + batch_size]:
                try:
                    pixels.append(load_image(s.path, resolution))
                    batch.append(s)
                except (OSError, ValueError, SyntaxError, LitedgeError):  # PIL raises these for broken files
                    skipped.append(str(s.path))
            if not batch:
                continue
            features = {"latents": _encode_images(torch.stack(pixels), vae)}
            if text:
                features.update(_encode_text([s.caption or "" for s in batch], text_encoder, tokenizer, text_max_length))
            else:
                features["class_labels"] = torch.tensor([s.label for s in batch], dtype=torch.int64)
            keys = sorted(features)
            pending.append(features)
            count += len(batch)
            flush()
        flush(final=True)
        if count == 0:
            raise LitedgeError(f"none of the {len(samples)} images could be decoded (first: {skipped[0]})")
        meta = {"format": CACHE_FORMAT, "version": 1, "count": count, "resolution": resolution,
                "keys": keys, "text_max_length": text_max_length if text else None, "skipped": skipped,
                "source": source if source is not None or isinstance(data, list) else str(Path(data).resolve()),
                "encoders": encoders}
        (tmp / CACHE_INDEX).write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_cache_info(out)


class FeatureCache(torch.utils.data.Dataset):
    """Reads one sample at a time from the shards (memory-mapped; nothing is loaded up front).

    ``cache[i]`` is a dict of tensors without the batch dimension.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.info = read_cache_info(Path(path))
        self._shards = []  # (first index, handle, length)
        first = 0
        for shard in sorted(Path(path).glob("shard-*.safetensors")):
            handle, length = open_shard(safe_open, shard, self.info.keys)  # litedge.distill.guards
            self._shards.append((first, handle, length))
            first += length
        if first != self.info.count:
            raise LitedgeError(f"{path}: cache holds {first} samples, cache.json says {self.info.count}: delete it to rebuild")

    def __len__(self) -> int:
        return self.info.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for first, handle, length in self._shards:
            if index < first + length:
                i = index - first
                return {k: handle.get_slice(k)[i:i + 1][0] for k in self.info.keys}
        raise IndexError(index)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Stacked tensors of the given samples, in order."""
        items = [self[i] for i in indices]
        return {k: torch.stack([item[k] for item in items]) for k in self.info.keys}


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / CACHE_INDEX).is_file()


def step_indices(count: int, batch: int, step: int, *, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's sample indices for training step ``step`` (0-based): a function of (seed, step).

    Epoch ``e`` is a ``DistributedSampler`` permutation seeded by ``seed`` and ``set_epoch(e)``;
    each rank takes its shard of it, ``batch`` samples per step, dropping the ragged end. So a
    resumed run sees exactly the batches the uninterrupted one would have.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(count), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise LitedgeError(
            f"--batch {batch} is larger than the {len(sampler)} samples per process ({count} cached over {world}): "
            "lower --batch or add data"
        )
    sampler.set_epoch(step // per_epoch)
    order = list(sampler)
    k = step % per_epoch
    return order[k * batch:(k + 1) * batch]
