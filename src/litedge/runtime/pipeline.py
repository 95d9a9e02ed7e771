"""The on-device pipeline: a bundle in, PIL images out, no torch.

::

    from litedge.runtime import Pipeline
    pipe = Pipeline.from_bundle("lit-t2i.litedge")                  # device="auto"
    out = pipe(prompt=["a red fox in the snow", "a cabin"], num_inference_steps=20,
               generator=[0, 1])                                    # diffusers' names; a seed per image
    save_png(out.images[0], "fox.png")                              # litedge.runtime.image
    pipe("a red fox", steps=20, seed=0)[0]                          # litedge's older names: the same call

The call takes diffusers' argument names and types (``prompt`` str or list, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``num_images_per_prompt``,
``generator``, ``latents``, ``callback_on_step_end``, ``output_type``, ``return_dict``) and returns
a :class:`PipelineOutput` (``.images``, ``.latents``) that also indexes and iterates like the list of
its images, as litedge's results did. ``steps``, ``seed`` and ``batch`` stay as aliases.

Seeds: one int seed or numpy Generator draws the whole batch's noise (B, C, h, w) at once; a list
(one seed or Generator per image) draws image i's noise from its own generator, so image i
equals a batch-1 run with generator i. A stochastic scheduler (``euler-ancestral``) takes its
step noise from the same generators.

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
from litedge.runtime.info import trained_size_warning
from litedge.runtime.memory import check_request, check_text
from litedge.runtime.schedulers import Scheduler, scheduler_from_config, split_learned_sigma
from litedge.runtime.session import ComponentSession
from litedge.runtime.vae import decode_latents, default_tiling

log = logging.getLogger("litedge.runtime")
TEXT_CACHE_SIZE = 8  # prompt encodings kept between calls (the negative prompt "" above all)
OUTPUT_TYPES = ("pil", "np", "latent")
Generators = np.random.Generator | list[np.random.Generator]


@dataclass(frozen=True)
class Request:
    """One validated generation request (what ends up in the PNG metadata).

    ``prompt``, ``negative_prompt`` and ``seed`` are image 0's; ``prompts``, ``negative_prompts``
    and ``seeds`` hold one entry per image (``batch`` in all). A seed is None where a numpy
    Generator was given instead.
    """

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int | None
    batch: int
    scheduler: str
    class_id: int | None
    null_caption: bool
    prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    seeds: tuple[int | None, ...] = ()

    def groups(self) -> list[Request]:
        """Runs of consecutive images with the same (prompt, negative prompt), each as a request of its own."""
        pairs = list(zip(self.prompts, self.negative_prompts)) or [(self.prompt, self.negative_prompt)] * self.batch
        out, start = [], 0
        for end in range(1, len(pairs) + 1):
            if end == len(pairs) or pairs[end] != pairs[start]:
                (p, n), k = pairs[start], end - start
                out.append(dataclasses.replace(self, prompt=p, negative_prompt=n, batch=k, prompts=(p,) * k,
                                               negative_prompts=(n,) * k, seeds=self.seeds[start:end]))
                start = end
        return out


@dataclass
class PipelineOutput:
    """What a :class:`Pipeline` call returns (diffusers' ``ImagePipelineOutput`` with the final latents).

    Attributes:
        images: ``output_type="pil"``: B RGB PIL images, settings in ``info["litedge"]``;
            ``"np"``: (B, H, W, 3) float32 in [0, 1]; ``"latent"``: the latents (B, C, h, w).
        latents: the final latents (B, C, h, w) float32, before the VAE decode.

    Indexing, ``len`` and iteration go over ``images`` (``out[0]`` is the first image), as
    litedge's list results did; diffusers' tuple form is ``return_dict=False``.
    """

    images: list[Image.Image] | np.ndarray
    latents: np.ndarray

    def __getitem__(self, index):
        return self.images[index]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator:
        return iter(self.images)


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
        vae = manifest.components.get("vae_decoder")
        self.vae_tile, self.vae_overlap = default_tiling(  # latent pixels; vae_tile = 0 never tiles
            self.vae_factor, vae.meta.get("decoder_channels") if vae is not None else None)
        self._sessions: dict[str, ComponentSession] = {}
        self._text_cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._text_keep = 0  # encodings the current call still needs (never evicted before it ends)
        self._interrupt = False
        self._size_warnings: set[str] = set()  # trained-size warnings already logged (once per size)
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

    def _request(self, prompt, negative_prompt, height, width, steps, guidance_scale, generator, batch, scheduler,
                 class_id, null_caption) -> Request:
        """Every check of a call's arguments, before any work: the validated :class:`Request`.

        ``batch`` is the images per prompt; ``generator`` an int seed, a numpy Generator or a
        list of them (one per image)."""
        d, m = self.manifest.defaults, self.manifest.model
        fallback = int(m.get("native_size") or int(m.get("sample_size", 128)) * self.vae_factor)
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
            raise LitedgeError(f"batch must be a positive integer (num_images_per_prompt), got {batch!r}")
        prompts, negatives = _prompt_lists(prompt, negative_prompt, int(batch))
        seeds = _seed_list(generator, len(prompts))
        for text in dict.fromkeys(prompts):
            self.conditioner.check(text, class_id, null_caption)
        for text in dict.fromkeys(prompts + negatives):  # image 0's are checked with the request below
            if text not in (prompts[0], negatives[0]):
                check_text("a prompt of the list", text)
        req = Request(prompts[0], negatives[0], int(height), int(width), int(steps), float(guidance_scale),
                      seeds[0], len(prompts), scheduler or self.manifest.scheduler.get("type", "dpmsolver++"),
                      class_id, null_caption, tuple(prompts), tuple(negatives), seeds)
        check_request(self, req)  # litedge.runtime.memory: UTF-8 text, upper bounds, memory from the manifest
        return req

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
        if flow != scheduler.flow:
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
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(texts), self._text_keep):
            self._text_cache.popitem(last=False)
        rows = [self._text_cache[t] for t in texts]
        return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}

    def _conditioning(self, req: Request) -> dict[str, np.ndarray]:
        """The transformer's conditioning inputs, batch (2B: uncond then cond) or (B) without guidance.

        Images with different prompts: each run of equal prompts is conditioned on its own (every
        text encoded in one encoder run first), then the unconditional halves go first, in order."""
        groups = req.groups()
        if len(groups) == 1:
            return self.conditioner(groups[0])
        if isinstance(self.conditioner, TextConditioner):
            texts = list(dict.fromkeys(t for g in groups for t in self.conditioner.texts(g)))
            self.encode_text(texts)  # one run of each text encoder, then every group from the cache
            self._text_keep = len(texts)
        try:
            parts = [self.conditioner(g) for g in groups]  # name -> (2b | b, ...) each
        finally:
            self._text_keep = 0
        halves = 2 if req.guidance_scale != 1.0 else 1
        return {name: np.concatenate([np.split(part[name], halves)[h] for h in range(halves) for part in parts])
                for name in parts[0]}

    # ------------------------------------------------------------------ the loop

    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from ``callback_on_step_end``) to stop after the current step, as
        diffusers' ``pipe._interrupt``; the images are decoded from the latents reached so far."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    def denoise(self, latents: np.ndarray, cond: dict[str, np.ndarray], scheduler: Scheduler,
                guidance_scale: float, progress: bool = True, callback=None) -> np.ndarray:
        """Run the reverse diffusion from noise ``latents`` (B, C, h, w); returns the final latents.

        ``cond`` holds the transformer's conditioning inputs for 2B rows (unconditional
        first) when ``guidance_scale != 1``, else for B rows; ``scheduler`` has its timesteps set.
        ``callback(pipe, i, t, {"latents": ...})`` runs after each step (see :meth:`__call__`).
        """
        transformer = self._image_session("transformer", latents)
        guided = guidance_scale != 1.0
        t_dtype = transformer.dtype("timestep")
        latents = (latents * scheduler.init_noise_sigma).astype(np.float32)
        for i, t in enumerate(_progress(scheduler.timesteps, progress)):
            if self.interrupt:
                break
            x = scheduler.scale_model_input(latents, i)
            x = np.concatenate([x, x]) if guided else x  # (2B | B, C, h, w)
            out = transformer.run(sample=x, timestep=np.full(len(x), t, dtype=t_dtype), **cond)
            if self.learned_sigma:
                out = split_learned_sigma(out, self.latent_channels)  # drop the predicted variance
            if guided:
                uncond, text = np.split(out, 2)
                out = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(out, i, latents)
            if callback is not None:
                latents = self._step_end(callback, i, t, latents)
        return latents

    def _step_end(self, callback, i: int, t, latents: np.ndarray) -> np.ndarray:
        """Run ``callback_on_step_end``; the latents it returns (same shape) replace the current ones."""
        result = callback(self, i, t, {"latents": latents})
        if result is None:
            return latents
        if not isinstance(result, dict):
            raise LitedgeError(f"callback_on_step_end must return a dict such as its callback_kwargs, "
                               f"got {type(result).__name__}")
        new = np.asarray(result.get("latents", latents))
        if new.shape != latents.shape or not np.issubdtype(new.dtype, np.floating):
            raise LitedgeError(f"callback_on_step_end returned latents {new.dtype} {new.shape}; expected a float "
                               f"array of shape {latents.shape}, as it was given")
        return new.astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32 in [-1, 1] (tiled when large)."""
        vae = self._image_session("vae_decoder", latents)
        name = next(iter(vae.inputs), "latent")
        tile = 0 if vae.bucket is not None else self.vae_tile  # a static graph decodes its whole size
        return decode_latents(lambda z: vae.run(**{name: np.ascontiguousarray(z, dtype=np.float32)}),
                              latents, self.vae_factor, tile, self.vae_overlap)

    def initial_latents(self, req: Request, latents: np.ndarray | None = None,
                        generator: Generators | None = None) -> np.ndarray:
        """Standard normal (B, C, h, w) float32, or ``latents`` checked.

        Drawn from ``generator``, default ``numpy.random.default_rng(req.seed)``: one Generator
        draws the whole (B, C, h, w) block, a list of B draws image i's (C, h, w) from generator i.
        """
        shape = (req.batch, self.latent_channels, req.height // self.vae_factor, req.width // self.vae_factor)
        if latents is None:
            gen = generator if generator is not None else np.random.default_rng(req.seed)
            if isinstance(gen, list):
                return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in gen])
            return gen.standard_normal(shape, dtype=np.float32)
        latents = np.asarray(latents)
        if latents.shape != shape or not np.issubdtype(latents.dtype, np.floating):
            raise LitedgeError(f"latents: expected a float array of shape {shape} (batch, channels, height/"
                               f"{self.vae_factor}, width/{self.vae_factor}), got {latents.dtype} {latents.shape}")
        return latents.astype(np.float32)

    def __call__(self, prompt: str | list[str] = "", negative_prompt: str | list[str] = "", *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int | None = None,
                 generator=None, latents: np.ndarray | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
                 scheduler: str | None = None, class_id: int | None = None, null_caption: bool = False,
                 progress: bool = True, steps: int | None = None, seed=None, batch: int | None = None):
        """Generate images; None takes the bundle's default (manifest ``defaults``). diffusers' names.

        Args:
            prompt: a text, or a list (text-to-image bundles); ``len(prompt) x num_images_per_prompt`` images.
            negative_prompt: the unconditional branch of classifier-free guidance ("" as diffusers):
                one text for every prompt, or a list as long as ``prompt``.
            num_inference_steps (alias ``steps``): denoising steps (>= 1).
            guidance_scale: CFG scale (>= 0; 1 skips the unconditional pass).
            height, width: pixels, multiples of VAE factor x patch size (16 for PixArt).
            num_images_per_prompt (alias ``batch``): images per prompt.
            generator (alias ``seed``, default 0): an int seed or a ``numpy.random.Generator`` for the
                whole batch, or a list of them, one per image (image i from generator i; the
                same seed + bundle + device -> the same pixels). ``latents`` (B, C, h, w) replace the noise.
            callback_on_step_end: ``f(pipe, step_index, timestep, callback_kwargs) -> dict`` after
                each step; ``callback_kwargs`` is ``{"latents": (B, C, h, w)}`` and the returned
                ``"latents"`` replace them. Setting ``pipe.interrupt = True`` stops the loop (the
                images are decoded from the latents so far). An exception it raises propagates
                (nothing is written: the pipeline writes no files).
            callback_on_step_end_tensor_inputs: only ``["latents"]``.
            output_type: ``"pil"``, ``"np"`` ((B, H, W, 3) float32 in [0, 1]) or ``"latent"`` (no decode).
            return_dict: False returns the tuple ``(images,)``, as diffusers.
            scheduler: a name of :data:`litedge.runtime.schedulers.SCHEDULERS` (``dpmsolver++``,
                ``dpmsolver++-karras``, ``unipc``, ``euler``, ``euler-ancestral``, ``ddim`` for
                noise-prediction bundles, ``flow-euler`` for SD3 / MM-EDiT) or a diffusers class
                name; default the bundle's.
            class_id: the ImageNet class of a class-conditional bundle (the null class is num_classes).
            null_caption: use the bundle's stored null caption embedding for the unconditional branch.
            progress: a tqdm bar on stderr with the time per step.

        Returns:
            :class:`PipelineOutput` (``.images``, ``.latents``); PIL images carry their settings as
            JSON in ``image.info["litedge"]``.

        Raises:
            LitedgeError: any bad argument (one line), before any model runs.
        """
        steps = _alias("num_inference_steps", num_inference_steps, "steps", steps)
        per_prompt = _alias("num_images_per_prompt", num_images_per_prompt, "batch", batch)
        generator = _alias("generator", generator, "seed", seed)
        if output_type not in OUTPUT_TYPES:
            raise LitedgeError(f"output_type {output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise LitedgeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        if [n for n in callback_on_step_end_tensor_inputs if n != "latents"]:
            raise LitedgeError(f"callback_on_step_end_tensor_inputs {list(callback_on_step_end_tensor_inputs)}: "
                               "this runtime passes only 'latents' to the callback")
        req = self._request(prompt, negative_prompt, height, width, steps, guidance_scale,
                            0 if generator is None else generator, 1 if per_prompt is None else per_prompt,
                            scheduler, class_id, null_caption)
        warning = trained_size_warning(self.manifest.model, req.height, req.width)
        if warning is not None and warning not in self._size_warnings:
            self._size_warnings.add(warning)
            log.warning(warning)
        sched = self._scheduler(req.scheduler)
        sched.set_timesteps(req.steps)
        gens = _generators(0 if generator is None else generator)
        noise = self.initial_latents(req, latents, gens)
        sched.generator = gens  # a stochastic scheduler's step noise continues each image's generator
        cond = self._conditioning(req)
        encoders = [n for n in self.manifest.components if n.startswith("text_encoder")]  # SD3 has three
        if encoders:  # release() without names would close every session
            self.release(*encoders)
        self.interrupt = False
        try:
            final = self.denoise(noise, cond, sched, req.guidance_scale, progress, callback_on_step_end)
            interrupted, self.interrupt = self.interrupt, False  # the flag does not outlive its call
            if self.low_memory:
                self.release("transformer")
            decoded = None if output_type == "latent" else self.decode(final)
        finally:
            self.interrupt = False
            if self.low_memory:
                self.release()
        if output_type == "latent":
            images = final
        elif output_type == "np":
            images = np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0).astype(np.float32)  # (B, H, W, 3)
        else:
            images = to_pil(decoded, self._metadata(req, sched, latents is not None, interrupted))
        return PipelineOutput(images, final) if return_dict else (images,)

    def _metadata(self, req: Request, sched: Scheduler, given_latents: bool, interrupted: bool) -> list[dict]:
        """One settings dict per image (its own prompt, negative prompt and seed; ``index`` in the batch)."""
        skip = ("null_caption", "prompts", "negative_prompts", "seeds")
        base = {k: v for k, v in asdict(req).items() if v is not None and k not in skip}
        base.update(bundle=self.bundle_dir.resolve().name, device=self.device.name, litedge=__version__,
                    sampler=sched.sampler_name)
        if given_latents:
            base["latents"] = "given"
        if interrupted:
            base["interrupted"] = True
        out = []
        for i in range(req.batch):
            meta = {**base, "prompt": req.prompts[i], "negative_prompt": req.negative_prompts[i], "index": i}
            meta.pop("seed", None)
            if req.seeds[i] is not None:
                meta["seed"] = req.seeds[i]
            out.append(self.conditioner.metadata(meta))
        return out

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alias(name: str, value, old: str, old_value):
    """diffusers' argument ``name`` or litedge's older ``old``: whichever is given (not both)."""
    if value is not None and old_value is not None:
        raise LitedgeError(f"give either {name} or {old} (the same setting), not both")
    return value if value is not None else old_value


def _prompt_lists(prompt, negative_prompt, per_prompt: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image: each prompt ``per_prompt`` times, in order."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise LitedgeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.60}")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, (list, tuple)):
        raise LitedgeError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    if len(negatives) != len(prompts):
        raise LitedgeError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: give one "
                           "negative prompt per prompt, or one string for all")
    for name, texts in (("prompt", prompts), ("negative_prompt", negatives)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise LitedgeError(f"{name}[{bad}] must be a string, got {type(texts[bad]).__name__}")
    return ([p for p in prompts for _ in range(per_prompt)], [n for n in negatives for _ in range(per_prompt)])


def _seed_list(generator, batch: int) -> tuple[int | None, ...]:
    """The seed of each of ``batch`` images (None for a Generator) from an int seed, a numpy
    Generator or a list of them (one per image); LitedgeError for anything else."""
    def one(g, where: str) -> int | None:
        if isinstance(g, np.random.Generator):
            return None
        if not _is_int(g) or g < 0:
            kind = "a torch.Generator: use numpy.random.default_rng(seed)" if "torch" in type(g).__module__ \
                else repr(g) if _is_int(g) else type(g).__name__
            raise LitedgeError(f"{where} must be an integer >= 0 or a numpy.random.Generator, got {kind}")
        return int(g)

    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise LitedgeError(f"generator has {len(generator)} entries for {batch} images: give one seed or numpy "
                               "Generator per image (len(prompt) x num_images_per_prompt), or a single one")
        return tuple(one(g, f"generator[{i}]") for i, g in enumerate(generator))
    return (one(generator, "seed"),) * batch


def _generators(generator) -> Generators:
    """A validated seed / Generator / list of them as numpy Generators (ints seed ``default_rng``)."""
    if isinstance(generator, (list, tuple)):
        return [g if isinstance(g, np.random.Generator) else np.random.default_rng(int(g)) for g in generator]
    return generator if isinstance(generator, np.random.Generator) else np.random.default_rng(int(generator))


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
