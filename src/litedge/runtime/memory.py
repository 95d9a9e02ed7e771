"""How much memory a request needs, from the manifest, before anything is allocated (torch-free).

A request that cannot fit would otherwise be killed by the kernel's OOM killer with no
message (``--size 100000`` asked for ~10^10 pixels) or fail deep inside numpy/onnxruntime.
:func:`check_request` refuses it with one line that states what would fit: the largest
square size at the requested batch, and the largest batch at the requested size.

The estimate (bytes) is a sum over what a generation holds at its peak, each term from the
manifest: the VAE factor ``f``, patch size ``p``, latent channels ``C``, the text length
``L`` and the widths the components' inputs declare (the transformer's caption width
``D``; without one, ``joint_attention_dim``, else a width derived from the transformer's
weight size)::

    weights     sum of the component files' sizes x 1.5 (a session holds a copy while loading)
    images      B x H x W x 30   (float32 decode, its clipped copy, uint8 and PIL copies)
    latents     rows x C x h x w x 4 x 6   (h = H/f; noise, guidance halves, solver history)
    transformer rows x N x D x 4 x 8 (N = h/p x w/p tokens; residual, qkv, 4x MLP live)
                (+ rows x N^2 x 4 for softmax-attention families: one head's scores)
    vae         B x (tile x f)^2 x c_v x 4, c_v = k x the decoder's full-resolution channels
                (the vae_decoder meta's ``decoder_channels[0]``: SDXL 128, SANA's DC-AE 128),
                k = 9 for an AutoencoderKL (calibrated on SDXL's VAE: +3.9 GB at 1024 px
                untiled, docs/design.md), 4 for an AutoencoderDC, at least 64 (narrow f32
                DC-AEs hold ~250 bytes per output pixel whatever their width: c0 = 16, 1.13 GB
                and c0 = 8, 1.35 GB peak RSS decoding 2048 px untiled in onnxruntime); bundles
                without it: c_v = sqrt(vae parameters / 40), also calibrated on SDXL. ``tile``
                is the runtime's (litedge.runtime.vae.default_tiling).
    text        rows x L x D_text x 4 x 8

The activation terms are doubled (onnxruntime's arena grows by doubling) and 256 MiB are
added for the process itself (interpreter, numpy, onnxruntime). Measured on the tiny test
bundle at 2048 px: estimate 730 MiB (640 MiB before ``decoder_channels``), peak RSS 658 MiB;
on the tiny f32 DC-AE bundle of tests/export/test_dc_vae.py at 2048 px (decoded in one pass):
2,568 MiB estimated, 1,348 MiB peak RSS; on the demo bundle at 512 px: 399 MiB estimated, 274 MiB
peak RSS (``/usr/bin/time -f %M lit-generate ... --steps 2``).

``rows`` is 2B with classifier-free guidance, else B. It is an estimate, not a bound:
generous where the manifest is silent, so what it accepts runs; what it refuses would not
have fit. The memory available is the kernel's ``MemAvailable`` (and a cgroup limit, when
one is set); where neither can be read nothing is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from litedge.bundle import MAX_GUIDANCE, MAX_STEPS, Manifest
from litedge.errors import LitedgeError

LINEAR_FAMILIES = ("lit", "edit", "mmedit")
GIB = 2**30
BASELINE = 256 * 2**20  # the interpreter, numpy, onnxruntime and the tokenizer, before any request


@dataclass(frozen=True)
class Shape:
    """What a request asks for: image size in pixels, images, guidance on or off."""

    height: int
    width: int
    batch: int
    guided: bool
    vae_tile: int | None = None  # latent pixels; None decodes the whole latent at once


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _last_int_dim(manifest: Manifest, component: str, name: str) -> int | None:
    comp = manifest.components.get(component)
    spec = comp.inputs.get(name) if comp is not None else None
    shape = spec.get("shape") if spec else None
    if shape and isinstance(shape[-1], int) and not isinstance(shape[-1], bool):
        return shape[-1]
    return None


def _file_bytes(bundle_dir: Path | None, manifest: Manifest, names: tuple[str, ...] | None = None) -> int:
    """Bytes of the components' files (and extra files) as they are on disk; 0 where unknown."""
    if bundle_dir is None:
        return 0
    total = 0
    for name, comp in manifest.components.items():
        if names is not None and name not in names:
            continue
        for rel in [comp.file, *(e["file"] for e in comp.extra_files)]:
            path = Path(bundle_dir) / rel
            try:
                if path.is_dir():
                    total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                else:
                    total += path.stat().st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class Model:
    """The manifest's numbers the estimate uses."""

    factor: int
    patch: int
    channels: int
    text_length: int
    width: int  # transformer activation width
    text_width: int
    softmax: bool
    weights: int  # bytes of every component file
    vae_channels: int
    fixed_batch: int | None  # static graphs: rows per run

    @classmethod
    def of(cls, manifest: Manifest, bundle_dir: Path | None = None) -> Model:
        m = manifest.model
        text_width = _last_int_dim(manifest, "transformer", "encoder_hidden_states")
        width = text_width or _int(m.get("joint_attention_dim"), 0)
        transformer_bytes = _file_bytes(bundle_dir, manifest, ("transformer",))
        if not width:  # class-conditional: a DiT's width from its size (~12 D^2 per block, ~28 blocks)
            width = max(64, int(math.sqrt(max(transformer_bytes, 1) / 4 / 12 / 28)))
        vae_bytes = _file_bytes(bundle_dir, manifest, ("vae_decoder",))
        vae_channels = max(16, int(math.sqrt(max(vae_bytes, 1) / 4 / 40)))
        vae = manifest.components.get("vae_decoder")
        stages = vae.meta.get("decoder_channels") if vae is not None else None
        if isinstance(stages, list) and stages and _int(stages[0], 0):  # activations scale with the full-res stage
            dc = vae.meta.get("vae_class") == "AutoencoderDC"
            vae_channels = max(64, 4 * stages[0]) if dc else max(16, 9 * stages[0])
        batch = manifest.components["transformer"].meta.get("batch") if "transformer" in manifest.components else None
        return cls(
            factor=_int(m.get("vae_scale_factor"), 8), patch=_int(m.get("patch_size"), 2),
            channels=_int(m.get("latent_channels"), 4), text_length=_int(m.get("text_max_length"), 0),
            width=width, text_width=text_width or width,
            softmax=str(m.get("family", "")) not in LINEAR_FAMILIES,
            weights=_file_bytes(bundle_dir, manifest), vae_channels=vae_channels,
            fixed_batch=_int(batch, 0) or None,
        )


def estimate_bytes(model: Model, shape: Shape) -> int:
    """Peak bytes of one generation of ``shape`` (see the module doc for each term)."""
    H, W, B = shape.height, shape.width, shape.batch
    rows_total = B * (2 if shape.guided else 1)
    rows = min(rows_total, model.fixed_batch) if model.fixed_batch else rows_total  # rows in one run
    h, w = max(1, H // model.factor), max(1, W // model.factor)
    tokens = max(1, h // model.patch) * max(1, w // model.patch)
    weights = int(model.weights * 1.5)
    images = B * H * W * 30
    latents = rows_total * model.channels * h * w * 4 * 6
    transformer = rows * tokens * model.width * 4 * 8
    if model.softmax:
        transformer += rows * tokens * tokens * 4
    side_h = min(h, shape.vae_tile) if shape.vae_tile else h
    side_w = min(w, shape.vae_tile) if shape.vae_tile else w
    vae_rows = 1 if model.fixed_batch else B
    vae = vae_rows * side_h * side_w * model.factor**2 * model.vae_channels * 4
    text = rows_total * model.text_length * model.text_width * 4 * 8
    # onnxruntime's arena grows by doubling: up to 2x the live activations; plus the process itself
    return BASELINE + weights + 2 * (images + latents + transformer + vae + text)


def available_bytes() -> int | None:
    """Memory this process can still allocate: ``MemAvailable``, capped by a cgroup v2/v1 limit; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            found.append(max(0, int(limit) - usage))
        break
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def largest_square(model: Model, shape: Shape, budget: int, multiple: int) -> int | None:
    """The largest square side (a multiple of ``multiple``) whose estimate fits ``budget`` at ``shape.batch``."""
    def fits(k: int) -> bool:
        side = k * multiple
        return estimate_bytes(model, Shape(side, side, shape.batch, shape.guided, shape.vae_tile)) <= budget

    if not fits(1):
        return None
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * multiple


def largest_batch(model: Model, shape: Shape, budget: int) -> int:
    """The largest batch at ``shape``'s size whose estimate fits ``budget`` (0: not even one)."""
    def fits(b: int) -> bool:
        return estimate_bytes(model, Shape(shape.height, shape.width, b, shape.guided, shape.vae_tile)) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_fits(manifest: Manifest, shape: Shape, bundle_dir: Path | None = None,
               available: int | None = None, what: str = "this request") -> int:
    """Raise a one-line LitedgeError when ``shape`` cannot fit the memory available; returns the estimate.

    ``available`` defaults to :func:`available_bytes`; None there means nothing is refused.
    """
    model = Model.of(manifest, bundle_dir)
    need = estimate_bytes(model, shape)
    budget = available if available is not None else available_bytes()
    if budget is None or need <= budget:
        return need
    multiple = model.factor * model.patch
    side = largest_square(model, shape, budget, multiple)
    batch = largest_batch(model, shape, budget)
    if side is None:
        fix = f"even {multiple}x{multiple} at batch {shape.batch} does not fit: lower --batch or free memory"
        if batch >= 1:
            fix = f"the largest batch that fits at {shape.height}x{shape.width} is {batch}"
        elif shape.batch > 1:
            one = largest_square(model, Shape(1, 1, 1, shape.guided, shape.vae_tile), budget, multiple)
            if one is not None:
                fix = f"at batch 1 the largest size that fits is {one}x{one} px"
    else:
        fix = f"the largest that fits is {side}x{side} px at batch {shape.batch}"
        if batch >= 1:
            fix += f", or batch {batch} at {shape.height}x{shape.width}"
    raise LitedgeError(f"{what} ({shape.height}x{shape.width} px, batch {shape.batch}) needs about "
                       f"{need / GIB:.1f} GiB of memory, but {budget / GIB:.1f} GiB is available; {fix} "
                       "(estimated from the bundle's manifest)")


def check_text(name: str, text) -> None:
    """A prompt must be text that UTF-8 can hold (argv bytes that are not UTF-8 arrive as lone surrogates)."""
    if not isinstance(text, str):
        raise LitedgeError(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LitedgeError(f"{name} is not valid UTF-8 (byte {text[e.start]!r} at position {e.start}); "
                           "pass the prompt as UTF-8 text") from None


def check_request(pipe, req) -> int:
    """The bounds of a validated ``Request`` of a ``Pipeline``: UTF-8 prompts, guidance at most
    ``MAX_GUIDANCE``, steps at most ``MAX_STEPS``, and :func:`check_fits` (its tiling and guidance)."""
    check_text("the prompt", req.prompt)
    check_text("the negative prompt", req.negative_prompt)
    if req.guidance_scale > MAX_GUIDANCE:
        raise LitedgeError(f"guidance scale {req.guidance_scale:g} is above {MAX_GUIDANCE:g}, where float32 images "
                           "saturate; use a value in [0, 100] (1 = no guidance; 3-8 is usual)")
    if req.steps > MAX_STEPS:
        raise LitedgeError(f"steps {req.steps} is above {MAX_STEPS}, the training schedule's timesteps; "
                           f"use at most {MAX_STEPS}")
    shape = Shape(req.height, req.width, req.batch, req.guidance_scale != 1.0,
                  vae_tile=getattr(pipe, "vae_tile", None) or None)
    return check_fits(pipe.manifest, shape, getattr(pipe, "bundle_dir", None))


def check_profile_sizes(manifest: Manifest, bundle_dir: Path | None, sizes, guided: bool) -> None:
    """:func:`check_fits` for each (height, width) lit-profile measures (one image, VAE untiled)."""
    for height, width in sizes:
        check_fits(manifest, Shape(int(height), int(width), 1, guided, vae_tile=None), bundle_dir,
                   what=f"profiling {Path(bundle_dir).name if bundle_dir is not None else 'the bundle'}")
