"""lit-distill's refusals, made before work starts or before anything is published.

- :func:`check_config`: numbers that cannot train (``--lr nan``/``inf``/``<= 0``, non-finite
  loss weights, ``--text-max-length`` outside [1, MAX_TEXT_LENGTH]), ``--out`` that is a
  file, ``--device cuda`` on a machine without CUDA;
- :func:`check_resolution`: ``--resolution`` must be a multiple of the teacher's VAE
  factor x patch size;
- :func:`check_finite_losses` / :func:`check_finite_weights`: a diverged run (NaN or inf
  loss or weights) stops before a checkpoint or the student is written, so a NaN student is
  never published;
- :func:`cleanup_on_refusal`: a refused or interrupted run leaves no empty run folder behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from litedge.atomic import clean_dead_temps, recover_interrupted
from litedge.bundle import MAX_TEXT_LENGTH
from litedge.errors import LitedgeError

FLOAT32_MAX = 3.4028234663852886e38


def _finite(name: str, value: Any, low: float = 0.0, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if strict else value >= low)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise LitedgeError(f"{name} {value!r}: expected a finite number {bound}")


def check_device(device: str | None) -> None:
    """``--device cuda[:N]`` needs a CUDA build of torch and a GPU; anything but cpu/cuda is refused."""
    if device is None or device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise LitedgeError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise LitedgeError(f"--device {device}: CUDA is not available on this machine (torch "
                           f"{torch.__version__}); use --device cpu, or install a CUDA build of torch")
    if ":" in device and int(device[5:]) >= torch.cuda.device_count():
        raise LitedgeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                           f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_config(cfg: Any) -> None:
    """What a DistillConfig's fields must hold beyond their own checks (see the module doc)."""
    _finite("--lr", cfg.lr, strict=True)
    if cfg.lr > FLOAT32_MAX:  # torch's AdamW cannot even hold it (RuntimeError: overflow)
        raise LitedgeError(f"--lr {cfg.lr!r}: expected a learning rate a float32 can hold (<= {FLOAT32_MAX:.3g}); "
                           "1e-4 is usual")
    _finite("--weight-decay", cfg.weight_decay)
    for name, value in (("--task-weight", cfg.task_weight), ("--lambda-noise", cfg.lambda_noise),
                        ("--lambda-var", cfg.lambda_var), ("--feature-weight", cfg.feature_weight)):
        _finite(name, value)
    text = cfg.text_max_length
    if isinstance(text, bool) or not isinstance(text, int) or not 1 <= text <= MAX_TEXT_LENGTH:
        raise LitedgeError(f"--text-max-length {text!r}: expected caption tokens >= 1 and <= {MAX_TEXT_LENGTH} "
                           "(PixArt-Sigma: 300)")
    if cfg.heads is not None and (isinstance(cfg.heads, bool) or not isinstance(cfg.heads, int) or cfg.heads < 1):
        raise LitedgeError(f"--heads {cfg.heads!r}: expected a positive number of heads")
    for name, value in (("--out", cfg.out), ("--data", cfg.data), ("--teacher", cfg.teacher)):
        if not str(value).strip():
            raise LitedgeError(f"{name} is empty; give a path")
    out = Path(cfg.out)
    if os.path.lexists(out) and not out.is_dir():
        raise LitedgeError(f"--out {out} exists and is not a folder; lit-distill writes a run folder there: "
                           "choose a new path")
    check_device(cfg.device)


def vae_factor(pipeline_dir: Path | None) -> int | None:
    """The spatial factor of the pipeline's VAE (2 ** (levels - 1); AutoencoderDC: of its encoder), or None."""
    if pipeline_dir is None:
        return None
    config = Path(pipeline_dir) / "vae" / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
    except (OSError, ValueError, AttributeError):
        return None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None


def check_resolution(resolution: int, teacher: Any, pipeline_dir: Path | None) -> None:
    """``--resolution`` must be a multiple of VAE factor x patch size (latents are cut in patches)."""
    factor = vae_factor(pipeline_dir) or 8
    patch = int(getattr(getattr(teacher, "config", None), "patch_size", 1) or 1)
    multiple = factor * patch
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise LitedgeError(f"--resolution {resolution}: must be a multiple of {multiple} (VAE factor {factor} x "
                           f"patch size {patch}); try {lower}")


def check_finite_losses(losses: dict[str, float], step: int) -> None:
    """Stop a diverged run at the step its loss stopped being a number."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        name, value = next(iter(bad.items()))
        raise LitedgeError(f"training diverged at step {step}: the {name} loss is {value}; nothing was published "
                           "from this step; lower --lr (or use --precision fp32) and rerun")


def check_finite_weights(module: Any, what: str) -> None:
    """Refuse to write ``module`` (a torch module) when any parameter or buffer is NaN or inf."""
    import torch

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LitedgeError(f"{what}: weight {name} is not finite (NaN or inf): the run diverged; "
                               "it was not written; lower --lr and rerun")


@contextmanager
def cleanup_on_refusal(out: str | os.PathLike) -> Iterator[None]:
    """Run a distillation; if it fails or is interrupted before writing a checkpoint, remove the
    run folder it created (an existing folder, or one holding checkpoints, is kept)."""
    out = Path(out)
    created = not os.path.lexists(out)
    if not created:  # a killed earlier run: its student swap undone, its dead temporaries removed
        recover_interrupted(out / "student")
        for folder in (out, out / "checkpoints", out / "cache"):
            clean_dead_temps(folder)
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not (out / "checkpoints").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_image_file(path: Path) -> None:
    """Refuse (LitedgeError) an image PIL would decode as a decompression bomb (more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS``), or one that is truncated or damaged (PNG chunks verified to IEND)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = im.width * im.height
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and pixels > limit:
                    raise LitedgeError(f"{path}: {im.width}x{im.height} pixels, more than PIL's limit of {limit}")
                im.verify()  # reads every chunk: a truncated or corrupted file raises here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise LitedgeError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise LitedgeError(f"{path}: truncated or damaged image ({type(e).__name__}: {e})") from None


def read_cache_index(index: Path) -> dict:
    """A feature cache's ``cache.json`` as a dict with count/resolution/keys, or one line saying it is damaged."""
    fix = f"delete {index.parent} to rebuild the cache"
    try:
        meta = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LitedgeError(f"{index}: unreadable feature-cache index ({type(e).__name__}); {fix}") from None
    ok = isinstance(meta, dict) and isinstance(meta.get("count"), int) and meta["count"] >= 0 \
        and isinstance(meta.get("resolution"), int) and isinstance(meta.get("keys"), list) \
        and all(isinstance(k, str) for k in meta["keys"]) and isinstance(meta.get("skipped", []), list)
    if not ok:
        raise LitedgeError(f"{index}: not a feature-cache index (count, resolution, keys); {fix}")
    return meta


def open_shard(safe_open: Any, shard: Path, keys: list[str]) -> tuple[Any, int]:
    """A cache shard opened lazily, with every key present and ``latents``' length; one line if damaged."""
    fix = f"delete {shard.parent} to rebuild the cache"
    try:
        handle = safe_open(str(shard), framework="pt")
        names = set(handle.keys())
        length = handle.get_slice("latents").get_shape()[0] if "latents" in names else None
    except Exception as e:  # noqa: BLE001  safetensors raises its own SafetensorError on truncated headers
        raise LitedgeError(f"{shard}: truncated or damaged cache shard ({type(e).__name__}); {fix}") from None
    missing = [k for k in keys if k not in names]
    if length is None or missing:
        raise LitedgeError(f"{shard}: cache shard without {', '.join(missing) or 'latents'}; {fix}")
    size = shard.stat().st_size
    for key in names:  # every tensor's bytes lie inside the file (safe_open maps lazily)
        info = handle.get_slice(key)
        shape, dtype = info.get_shape(), info.get_dtype()
        itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                    "BOOL": 1}.get(dtype, 1)
        count = 1
        for d in shape:
            count *= d
        if count * itemsize > size:
            raise LitedgeError(f"{shard}: truncated cache shard ({key} needs {count * itemsize} bytes); {fix}")
    return handle, length
