"""The on-device pipeline: a bundle in, PIL images out, no torch.

::

    from litedge.runtime import Pipeline
    pipe = Pipeline.from_bundle("lit-t2i.litedge")                  # device="auto"
    image = pipe("a red fox in the snow", steps=20, seed=0)[0]      # PIL.Image
    save_png(image, "fox.png")                                      # litedge.runtime.image

Steps: validate the request against the manifest -> the transformer's conditioning, by
model kind (:mod:`litedge.runtime.conditioning`: PixArt's T5, SD3's two CLIPs + T5, DiT's
class; text encoders released right after) -> seeded Gaussian latents -> the denoising
loop (classifier-free guidance with the unconditional half first, as diffusers'
pipelines) -> VAE decode (tiled when large) -> uint8 images with their
settings as metadata. ``low_memory=True`` keeps at most one component session alive.

Static-shape bundles (directml, snapdragon) hold one graph per image size: the session of a
component with ``meta["buckets"]`` is opened for the request's "HxW" (cached as
``"name@HxW"``), other sizes are refused; prompts are tokenized to the graphs' fixed
``meta["text_length"]``; a fixed batch (transformer 2 = cond + uncond, VAE 1) takes any
number of rows in chunks (:class:`ComponentSession`), so guidance 1 and any ``batch`` work.
"""

from __future__ import annotations

import logging
import math
import dataclasses
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from litedge import __version__
from litedge.bundle import Manifest, verify_bundle
from litedge.errors import LitedgeError
from litedge.runtime.conditioning import CONDITIONERS, Conditioner, TextConditioner
from litedge.runtime.conditioning import is_int as _is_int
from litedge.runtime.devices import Device, resolve_device
from litedge.runtime.image import to_pil
from litedge.runtime.schedulers import FlowMatchEuler, Scheduler, scheduler_from_config, split_learned_sigma
from litedge.runtime.session import ComponentSession
from litedge.runtime.vae import OVERLAP, TILE, decode_latents

log = logging.getLogger("litedge.runtime")
TEXT_CACHE_SIZE = 8  # prompt encodings kept between calls (the negative prompt "" above all)


@dataclass(frozen=True)
class Request:
    """One validated generation request (what ends up in the PNG metadata)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    batch: int
    scheduler: str
    class_id: int | None
    null_caption: bool


class Pipeline:
    """Text-to-image (PixArt-like, SD3 / MM-EDiT) or class-conditional (DiT-like) generation from a bundle."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, device: Device, low_memory: bool = False) -> None:
        manifest = _static_text_length(manifest)
        self.bundle_dir, self.manifest, self.device, self.low_memory = bundle_dir, manifest, device, low_memory
        model = manifest.model
        self.latent_channels = int(model.get("latent_channels", 4))
        self.vae_factor = int(model.get("vae_scale_factor", 8))
        self.patch_size = int(model.get("patch_size", 2))
        self.learned_sigma = bool(model.get("learned_sigma", False))
        self.kind = self._kind()
        self.conditioner: Conditioner = CONDITIONERS[self.kind](self)
        self.vae_tile, self.vae_overlap = TILE, OVERLAP  # latent pixels; vae_tile = 0 never tiles
        self._sessions: dict[str, ComponentSession] = {}
        self._text_cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        needed = ["transformer", "vae_decoder", *self.conditioner.required]
        missing = [n for n in needed if n not in manifest.components]
        if missing:
            raise LitedgeError(f"{bundle_dir}: the bundle has no {' or '.join(missing)} component, which image "
                               "generation needs; re-export it from a full pipeline directory (vae/, text_encoder/)")

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto", low_memory: bool = False) -> Pipeline:
        """Open a bundle: manifest and sha256 of every file checked, device resolved.

        Args:
            path: a ``NAME.litedge`` directory written by ``lit-export``.
            device: ``"auto"`` (the bundle's target device if present, else CPU, logged),
                or ``cpu``, ``cuda``, ``directml``, ``qnn``, ``coreml``.
            low_memory: hold one component session at a time (slower across calls).

        Raises:
            LitedgeError: not a bundle, a corrupt file, an unsupported model, an unavailable device.
        """
        bundle_dir = Path(path)
        if not bundle_dir.is_dir():
            raise LitedgeError(f"{bundle_dir}: no such bundle directory; pass a NAME.litedge folder made by lit-export")
        manifest = verify_bundle(bundle_dir)
        return cls(bundle_dir, manifest, resolve_device(device, manifest.target), low_memory)

    def _kind(self) -> str:
        meta = self.manifest.components.get("transformer")
        kind = (meta.meta.get("kind") if meta else None) or (
            "dit" if self.manifest.model.get("task") == "class-conditional" else "pixart")
        if kind not in CONDITIONERS:
            raise LitedgeError(f"{self.bundle_dir}: the runtime does not generate with {kind!r} transformers "
                               f"(expected one of {sorted(CONDITIONERS)}); upgrade litedge")
        return kind

    # ------------------------------------------------------------------ sessions

    def _session(self, name: str, size: tuple[int, int] | None = None) -> ComponentSession:
        """The session of component ``name``; for a static component (``meta["buckets"]``), its
        graph for the image ``size`` (height, width) in pixels, cached as ``"name@HxW"``."""
        component = self.manifest.components[name]
        bucket = None
        if component.meta.get("buckets"):
            if size is None:
                raise LitedgeError(f"{name}: this static-shape component needs an image size to pick its graph")
            bucket = f"{size[0]}x{size[1]}"
        key = name if bucket is None else f"{name}@{bucket}"
        if key not in self._sessions:
            if self.low_memory:
                self.release()
            self._sessions[key] = ComponentSession.open(
                self.bundle_dir, name, component, self.device, self.low_memory, bucket=bucket)
        return self._sessions[key]

    def _image_session(self, name: str, latents: np.ndarray) -> ComponentSession:
        """The session of ``name`` for latents (B, C, h, w): a static component's graph for that image size."""
        if not self.manifest.components[name].meta.get("buckets"):
            return self._session(name)
        return self._session(name, (latents.shape[2] * self.vae_factor, latents.shape[3] * self.vae_factor))

    def release(self, *names: str) -> None:
        """Close the named component sessions, every bucket of each (all without names); they reopen when needed."""
        keys = list(self._sessions) if not names else \
            [k for k in self._sessions if k in names or k.split("@", 1)[0] in names]
        for key in keys:
            session = self._sessions.pop(key, None)
            if session is not None:
                session.close()

    # ------------------------------------------------------------------ the request

    def _request(self, prompt, negative_prompt, height, width, steps, guidance_scale, seed, batch, scheduler,
                 class_id, null_caption) -> Request:
        d, m = self.manifest.defaults, self.manifest.model
        fallback = int(m.get("sample_size", 128)) * self.vae_factor
        height = height if height is not None else d.get("height", fallback)
        width = width if width is not None else d.get("width", height)
        steps = steps if steps is not None else d.get("steps", 20)
        guidance_scale = guidance_scale if guidance_scale is not None else d.get("guidance_scale", 4.5)
        multiple = self.vae_factor * self.patch_size
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % multiple:
                near = max(multiple, round(value / multiple) * multiple) if _is_int(value) else multiple * 64
                raise LitedgeError(f"{name} {value!r} must be a positive multiple of {multiple} (VAE factor "
                                   f"{self.vae_factor} x patch size {self.patch_size}); try {near}")
        sizes = self._static_sizes()
        if sizes is not None and f"{height}x{width}" not in sizes:
            raise LitedgeError(f"{height}x{width}: this static-shape bundle was exported for {', '.join(sizes)}: "
                               "use one of those sizes or re-export with --sizes")
        if not _is_int(steps) or steps <= 0:
            raise LitedgeError(f"steps must be a positive integer, got {steps!r}; try 20")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise LitedgeError(f"guidance scale must be a number >= 0 (1 = no guidance), got {guidance_scale!r}; "
                               f"try {d.get('guidance_scale', 4.5)}")
        if not _is_int(batch) or batch <= 0:
            raise LitedgeError(f"batch must be a positive integer, got {batch!r}")
        if not _is_int(seed) or seed < 0:
            raise LitedgeError(f"seed must be an integer >= 0, got {seed!r}")
        self.conditioner.check(prompt, class_id, null_caption)
        return Request(prompt, negative_prompt, int(height), int(width), int(steps), float(guidance_scale),
                       int(seed), int(batch), scheduler or self.manifest.scheduler.get("type", "dpmsolver++"),
                       class_id, null_caption)

    def _static_sizes(self) -> list[str] | None:
        """The "HxW" sizes every static component has a graph for (None: any size)."""
        sizes = None
        for name in ("transformer", "vae_decoder"):
            component = self.manifest.components[name]
            buckets = component.meta.get("buckets")
            if buckets:
                keys = list(buckets)
            elif component.shapes != "dynamic" and component.shapes:
                keys = [f"{h}x{w}" for h, w in component.shapes]
            else:
                continue
            sizes = keys if sizes is None else [k for k in sizes if k in keys]
        return sizes

    def _scheduler(self, name: str) -> Scheduler:
        config = self.manifest.scheduler.get("config", {})
        scheduler = scheduler_from_config(config, name=name)
        flow = self.manifest.model.get("prediction_type") == "flow"
        if flow != isinstance(scheduler, FlowMatchEuler):
            raise LitedgeError(f"scheduler {name!r} does not fit this bundle's {'flow-matching' if flow else 'noise'}"
                               f"-prediction model; use {self.manifest.scheduler.get('type', 'the default')!r} "
                               "or leave --scheduler out")
        return scheduler

    # ------------------------------------------------------------------ conditioning

    def encode_text(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Prompts -> the transformer's text inputs, one row per text (e.g. PixArt's
        ``encoder_hidden_states`` (T, L, D) float32 and ``encoder_attention_mask`` (T, L) int64);
        cached per text, text encoders released after."""
        if not isinstance(self.conditioner, TextConditioner):
            raise LitedgeError(f"this {self.kind!r} bundle is not conditioned on text: it has no text encoder")
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if todo:
            encoded = self.conditioner.encode(todo)  # name -> (len(todo), ...)
            for i, text in enumerate(todo):
                self._text_cache[text] = {name: value[i:i + 1] for name, value in encoded.items()}
        for text in texts:
            self._text_cache.move_to_end(text)
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(texts)):
            self._text_cache.popitem(last=False)
        rows = [self._text_cache[t] for t in texts]
        return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}

    def _conditioning(self, req: Request) -> dict[str, np.ndarray]:
        """The transformer's conditioning inputs, batch (2B: uncond then cond) or (B) without guidance."""
        return self.conditioner(req)

    # ------------------------------------------------------------------ the loop

    def denoise(self, latents: np.ndarray, cond: dict[str, np.ndarray], scheduler: Scheduler,
                guidance_scale: float, progress: bool = True) -> np.ndarray:
        """Run the reverse diffusion from noise ``latents`` (B, C, h, w); returns the final latents.

        ``cond`` holds the transformer's conditioning inputs for 2B rows (unconditional
        first) when ``guidance_scale != 1``, else for B rows; ``scheduler`` has its timesteps set.
        """
        transformer = self._image_session("transformer", latents)
        guided = guidance_scale != 1.0
        t_dtype = transformer.dtype("timestep")
        latents = (latents * scheduler.init_noise_sigma).astype(np.float32)
        for i, t in enumerate(_progress(scheduler.timesteps, progress)):
            x = np.concatenate([latents, latents]) if guided else latents  # (2B | B, C, h, w)
            out = transformer.run(sample=x, timestep=np.full(len(x), t, dtype=t_dtype), **cond)
            if self.learned_sigma:
                out = split_learned_sigma(out, self.latent_channels)  # drop the predicted variance
            if guided:
                uncond, text = np.split(out, 2)
                out = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(out, i, latents)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32 in [-1, 1] (tiled when large)."""
        vae = self._image_session("vae_decoder", latents)
        name = next(iter(vae.inputs), "latent")
        tile = 0 if vae.bucket is not None else self.vae_tile  # a static graph decodes its whole size
        return decode_latents(lambda z: vae.run(**{name: np.ascontiguousarray(z, dtype=np.float32)}),
                              latents, self.vae_factor, tile, self.vae_overlap)

    def initial_latents(self, req: Request, latents: np.ndarray | None = None) -> np.ndarray:
        """Standard normal (B, C, h, w) float32 from ``numpy.random.default_rng(seed)``, or ``latents`` checked."""
        shape = (req.batch, self.latent_channels, req.height // self.vae_factor, req.width // self.vae_factor)
        if latents is None:
            return np.random.default_rng(req.seed).standard_normal(shape, dtype=np.float32)
        latents = np.asarray(latents)
        if latents.shape != shape or not np.issubdtype(latents.dtype, np.floating):
            raise LitedgeError(f"latents: expected a float array of shape {shape} (batch, channels, height/"
                               f"{self.vae_factor}, width/{self.vae_factor}), got {latents.dtype} {latents.shape}")
        return latents.astype(np.float32)

    def __call__(self, prompt: str = "", *, negative_prompt: str = "", height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 seed: int = 0, batch: int = 1, scheduler: str | None = None, latents: np.ndarray | None = None,
                 class_id: int | None = None, null_caption: bool = False, progress: bool = True) -> list[Image.Image]:
        """Generate ``batch`` images; None takes the bundle's default (manifest ``defaults``).

        Args:
            prompt / negative_prompt: text (text-to-image bundles); the negative prompt is the
                unconditional branch of classifier-free guidance ("" as diffusers).
            height, width: pixels, multiples of VAE factor x patch size (16 for PixArt).
            steps, guidance_scale: denoising steps (>= 1) and CFG scale (>= 0; 1 skips the
                unconditional pass).
            seed: initial noise ``default_rng(seed).standard_normal``; same seed + bundle +
                device -> same pixels. ``latents`` (B, C, h, w) replaces that noise.
            scheduler: ``dpmsolver++``, ``ddim`` (noise-prediction bundles), ``flow-euler`` (SD3 / MM-EDiT)
                or a diffusers class name; default the bundle's.
            class_id: the ImageNet class of a class-conditional bundle (the null class is num_classes).
            null_caption: use the bundle's stored null caption embedding for the unconditional branch.
            progress: a tqdm bar on stderr with the time per step.

        Returns:
            ``batch`` RGB images; ``image.info["litedge"]`` holds the settings as JSON.
        """
        req = self._request(prompt, negative_prompt, height, width, steps, guidance_scale, seed, batch,
                            scheduler, class_id, null_caption)
        sched = self._scheduler(req.scheduler)
        sched.set_timesteps(req.steps)
        noise = self.initial_latents(req, latents)
        cond = self._conditioning(req)
        self.release("text_encoder")
        final = self.denoise(noise, cond, sched, req.guidance_scale, progress)
        if self.low_memory:
            self.release("transformer")
        images = self.decode(final)
        if self.low_memory:
            self.release()
        return to_pil(images, self._metadata(req, given_latents=latents is not None))

    def _metadata(self, req: Request, given_latents: bool) -> list[dict]:
        base = self.conditioner.metadata(
            {k: v for k, v in asdict(req).items() if v is not None and k != "null_caption"})
        base.update(bundle=self.bundle_dir.resolve().name, device=self.device.name, litedge=__version__)
        if given_latents:
            base["latents"] = "given"
        return [{**base, "index": i} for i in range(req.batch)]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _static_text_length(manifest: Manifest) -> Manifest:
    """The manifest with ``model["text_max_length"]`` set to the static graphs' fixed prompt
    length (``meta["text_length"]`` of the text encoder, else the transformer), so prompts are
    padded / cut (with a warning) to what the graphs take. SD3's transformer length is the
    joint CLIP + T5 sequence; its T5 gets the rest. Dynamic bundles come back unchanged."""
    comps = manifest.components
    kind = (comps["transformer"].meta.get("kind") if "transformer" in comps else None) or "pixart"
    if kind == "sd3":
        clip = int(manifest.model.get("clip_max_length", 77))
        t5 = comps["text_encoder_3"].meta.get("text_length") if "text_encoder_3" in comps else None
        joint = comps["transformer"].meta.get("text_length") if "transformer" in comps else None
        length = t5 if t5 is not None else (int(joint) - clip if joint is not None else None)
    else:
        length = next((comps[n].meta.get("text_length") for n in ("text_encoder", "transformer")
                       if n in comps and comps[n].meta.get("text_length") is not None), None)
    if kind == "dit" or length is None or int(length) == manifest.model.get("text_max_length"):
        return manifest
    return dataclasses.replace(manifest, model={**manifest.model, "text_max_length": int(length)})


def _progress(timesteps: Iterable, enabled: bool) -> Iterator:
    """Yield the timesteps with a tqdm bar showing the last step's time."""
    steps = list(timesteps)
    bar = tqdm(total=len(steps), desc="denoising", unit="step", disable=not enabled, file=sys.stderr)
    last = time.perf_counter()
    try:
        for t in steps:
            yield t
            now = time.perf_counter()
            bar.set_postfix_str(f"{now - last:.2f} s/step", refresh=False)
            bar.update(1)
            last = now
    finally:
        bar.close()
