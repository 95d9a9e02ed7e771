"""export_bundle(): a model source -> a ``NAME.litedge`` bundle for one target.

The steps are always the same: load the model (or build a named architecture with random
weights), hand each component to the target's backend (export, parity check, weights),
copy the tokenizer and scheduler config, and let :class:`litedge.bundle.BundleWriter`
hash every file, write the manifest last and move the finished bundle into place.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.backend import BackendOptions, ExportReport, load_backend, stage
from litedge.export.targets import get_target
from litedge.export.validate import check_export_config

# Defaults of the base pipelines (diffusers' PixArtSigmaPipeline / StableDiffusion3Pipeline / DiTPipeline).
BASE_DEFAULTS = {
    "pixart": {"base": "pixart-sigma", "task": "text-to-image", "steps": 20, "guidance_scale": 4.5, "text_max_length": 300},
    "sd3": {"base": "sd3.5", "task": "text-to-image", "steps": 28, "guidance_scale": 7.0, "text_max_length": 256},
    "dit": {"base": "dit", "task": "class-conditional", "steps": 50, "guidance_scale": 4.0, "text_max_length": 0},
}


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``lit-export`` needs, typed once from the command line.

    Attributes:
        out: the bundle directory to write (``NAME.litedge``).
        source: a pipeline/transformer directory, ``.safetensors`` or original ``.pth``.
        config_name: a named config to export with random weights instead of a source.
        target: a name in :data:`litedge.export.targets.TARGETS`.
        weights: "fp", "int4" or "int8"; None takes the target's default.
        sizes: image sizes in pixels for static-shape targets (square buckets).
        keep_fp: layer-name patterns kept in full precision by explicit choice.
        soc: Snapdragon SoC (e.g. "sm8650") for the snapdragon target.
        hub_device: also compile + profile on this Qualcomm AI Hub device.
        force: replace an existing bundle at ``out``.
        text_max_length: prompt tokens; None takes the base model's.
        steps, guidance_scale: the sampling defaults the bundle's manifest records (what
            lit-generate uses when not told); None takes the base pipeline's (PixArt 20, 4.5).
        text_encoder_weights: "fp", "int4" or "int8" for the text encoders (e.g. fp for a
            higher-precision encoder than the transformer); None: as ``weights``.
        trained_sizes: the square image sizes (px) the model was trained at, recorded as the
            manifest's ``model.trained_sizes`` (lit-generate warns far from them); () takes the
            transformer config's ``trained_sizes`` if it has one, else the native size.
        native_size: the square size (px) lit-generate makes when not told, recorded as
            ``model.native_size`` and ``defaults.height/width``; None takes the transformer
            config's ``native_size`` if it has one, else sample_size x VAE factor (a model whose
            position grid is laid on a smaller base size, as PixArt's ``interpolation_scale``,
            can be native at a larger size than its sample_size says).
    """

    out: Path
    source: Path | None = None
    config_name: str | None = None
    target: str = "cpu"
    weights: str | None = None
    sizes: tuple[int, ...] = ()
    keep_fp: tuple[str, ...] = ()
    soc: str | None = None
    hub_device: str | None = None
    force: bool = False
    text_max_length: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    text_encoder_weights: str | None = None
    teacher: bool = False  # export the softmax teacher, attention in query chunks (rewrites.bound_attention_)
    trained_sizes: tuple[int, ...] = ()
    native_size: int | None = None

    def __post_init__(self) -> None:
        _check_trained_sizes(self.trained_sizes, "--trained-sizes")
        if self.native_size is not None:
            _check_trained_sizes([self.native_size], "--native-size")
        if self.steps is not None and self.steps < 1:
            raise LitedgeError(f"--steps {self.steps}: expected a default step count >= 1")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise LitedgeError(f"--guidance {self.guidance_scale}: expected a finite guidance scale >= 0")
        check_export_config(self)  # litedge.export.validate: output vs source, value bounds, --soc


def _check_trained_sizes(sizes, where: str, multiple: int = 1) -> tuple[int, ...]:
    """``sizes`` as a tuple of image sides in px, each in [1, MAX_IMAGE_SIDE] and a multiple of ``multiple``."""
    from litedge.bundle import MAX_IMAGE_SIDE

    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise LitedgeError(f"{where} {sizes!r}: expected a list of image sizes in pixels, e.g. [256, 512, 1024]")
    bad = [s for s in sizes if not 0 < s <= MAX_IMAGE_SIDE or s % multiple]
    if bad:
        raise LitedgeError(f"{where} {','.join(map(str, bad))}: image sizes must be positive multiples of {multiple} "
                           f"(VAE factor x patch size) up to {MAX_IMAGE_SIDE} px")
    return tuple(sorted(set(sizes)))


def _native_size(cfg: ExportConfig, loaded, factor: int) -> int:
    """--native-size, else the transformer config's ``native_size``, else sample_size x VAE factor ``factor``."""
    config = loaded.transformer.config
    multiple = factor * int(config.patch_size)
    if cfg.native_size is not None:
        return _check_trained_sizes([cfg.native_size], "--native-size", multiple)[0]
    declared = config.get("native_size")  # diffusers keeps the unknown keys of a config.json in .config
    if declared is not None:
        return _check_trained_sizes([declared], "transformer/config.json native_size", multiple)[0]
    return int(config.sample_size) * factor


def _trained_sizes(cfg: ExportConfig, loaded, factor: int) -> list[int]:
    """What the manifest records as ``trained_sizes``: --trained-sizes, else the transformer config's
    ``trained_sizes``, else [the native size] (:func:`_native_size`)."""
    config = loaded.transformer.config
    multiple = factor * int(config.patch_size)
    if cfg.trained_sizes:
        return list(_check_trained_sizes(cfg.trained_sizes, "--trained-sizes", multiple))
    declared = config.get("trained_sizes")  # diffusers keeps the unknown keys of a config.json in .config
    if declared is not None:
        return list(_check_trained_sizes(declared, "transformer/config.json trained_sizes", multiple))
    return [_native_size(cfg, loaded, factor)]


def _load(cfg: ExportConfig, workdir: Path):
    """The source, opened lazily: a directory's weights stay on disk (``loaded.weights``).

    ``--config NAME --random-weights`` first builds the config's complete random pipeline
    (text encoders, tokenizers, VAE; bf16 shards as real checkpoints) in ``workdir``.
    """
    from litedge.models.loading import open_model

    if cfg.config_name is not None:
        from litedge.models.configs import get_config
        from litedge.models.random_pipeline import build_random_pipeline

        get_config(cfg.config_name)  # an unknown name is one line before anything is built
        stage(f"building a random-weight {cfg.config_name} pipeline (bf16 shards, as real checkpoints are stored)")
        loaded = open_model(build_random_pipeline(cfg.config_name, workdir / "random-pipeline"))
        loaded.source = cfg.config_name
        if cfg.teacher:  # the config's softmax teacher in place of its student (random, in memory)
            from litedge.models.configs import build_model

            loaded.transformer, loaded.weights, loaded.linear = build_model(cfg.config_name, teacher=True), None, None
    elif cfg.source is None:
        raise LitedgeError("nothing to export: give a SOURCE, or --config NAME --random-weights")
    else:
        loaded = open_model(cfg.source)
    if cfg.teacher:
        from litedge.export.rewrites import teacher_for_export

        teacher_for_export(loaded, bounded=cfg.target == "cpu")
    return loaded


def _component(backend, name: str, module, weights, key_of=None):
    """``(module, weights kwargs)`` for a backend call: a skeleton streams, otherwise it is filled first."""
    if weights is None:
        return module, {}
    if name in backend.streams:
        return module, {"weights": weights}
    from litedge.models.weights import materialize

    stage(f"{name}: loading its weights whole (target {backend.target.name} converts the full model)")
    return materialize(module, weights, key_of=key_of), {}


def _pipeline_part(loaded, name: str) -> Path | None:
    part = loaded.pipeline_dir / name if loaded.pipeline_dir is not None else None
    return part if part is not None and part.is_dir() else None


def _open_vae(loaded):
    """The source's VAE as a skeleton and its lazily read weights; (None, None) without vae/."""
    vae_dir = _pipeline_part(loaded, "vae")
    if vae_dir is None:
        stage("no vae/ in the source: the bundle holds the transformer only (enough for lit-profile)")
        return None, None
    import diffusers

    from litedge.export.specs import vae_class_name
    from litedge.models.weights import SafetensorsWeights, empty_weights, placeholder_parameters

    config = _json(vae_dir / "config.json")
    cls = getattr(diffusers, vae_class_name(config))  # AutoencoderKL or AutoencoderDC (SANA's DC-AE)
    weights = SafetensorsWeights(vae_dir)
    with empty_weights():
        vae = cls.from_config(config)
    return placeholder_parameters(vae).eval(), weights


def _source_vae_factor(cfg: ExportConfig) -> int:
    """The VAE factor of the source's vae/config.json, read before anything is loaded (8 without one:
    random-weight configs build 8x AutoencoderKLs; a lone transformer is exported as for an 8x VAE)."""
    from litedge.export.specs import vae_scale_factor

    config = Path(cfg.source) / "vae" / "config.json" if cfg.source is not None else None
    if config is None or not (Path(cfg.source) / "model_index.json").is_file() or not config.is_file():
        return 8
    return vae_scale_factor(_json(config))


def _check_vae_latents(loaded) -> None:
    """The VAE's latent channels must be the transformer's input channels (read from vae/config.json)."""
    from litedge.export.specs import vae_latent_channels

    vae_dir = _pipeline_part(loaded, "vae")
    if vae_dir is None:
        return
    channels, latent = vae_latent_channels(_json(vae_dir / "config.json")), int(loaded.transformer.config.in_channels)
    if channels != latent:
        raise LitedgeError(f"{vae_dir}: the VAE has {channels} latent channels but the transformer takes {latent} "
                           "(in_channels): export a transformer trained on this VAE's latents")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LitedgeError(f"{path}: not a readable JSON config ({exc}); fix or re-download it") from None
    if not isinstance(value, dict):
        raise LitedgeError(f"{path}: expected a JSON object of settings, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a pipeline: its folder (= bundle component name), tokenizer folder, class."""

    name: str
    tokenizer: str
    cls: str  # a transformers class
    required: bool = True  # False: generation works without it (SD3's T5: zeros, as diffusers)


# The text encoders each base pipeline reads prompts with, in the order its pipeline uses them.
TEXT_ENCODERS: dict[str, tuple[TextEncoderSlot, ...]] = {
    "pixart": (TextEncoderSlot("text_encoder", "tokenizer", "T5EncoderModel"),),
    "sd3": (
        TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),  # CLIP-L
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),  # CLIP-G
        TextEncoderSlot("text_encoder_3", "tokenizer_3", "T5EncoderModel", required=False),  # T5-XXL
    ),
    "dit": (),
}


def _text_encoder_slots(loaded) -> list[TextEncoderSlot]:
    """The slots present in the source (encoder and tokenizer folders); a note for each one missing."""
    present = []
    for slot in TEXT_ENCODERS[loaded.kind]:
        if _pipeline_part(loaded, slot.name) is not None and _pipeline_part(loaded, slot.tokenizer) is not None:
            present.append(slot)
        elif slot.required:
            stage(f"no {slot.name}/ + {slot.tokenizer}/ in the source: the bundle has no {slot.name} "
                  "(it cannot generate from prompts)")
        else:
            stage(f"no {slot.name}/ + {slot.tokenizer}/ in the source: the runtime feeds zeros instead, as diffusers")
    return present


def _open_text_encoder(loaded, slot: TextEncoderSlot):
    """A text encoder as a skeleton (its config) and its lazily read safetensors weights."""
    from litedge.models.loading import open_text_encoder

    return open_text_encoder(_pipeline_part(loaded, slot.name), slot.cls)


def _copy_tokenizer(loaded, writer: BundleWriter, slot: TextEncoderSlot) -> dict:
    """The tokenizer folder into the bundle (a CLIP vocab.json + merges.txt gets its tokenizer.json made)."""
    source, dest = _pipeline_part(loaded, slot.tokenizer), writer.path / slot.tokenizer
    if slot.cls.startswith("CLIP") and not (source / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        CLIPTokenizer.from_pretrained(source).save_pretrained(dest)
    else:
        shutil.copytree(source, dest)
    kind = "tokenizers" if (dest / "tokenizer.json").is_file() else "sentencepiece"
    return {"kind": kind, "path": slot.tokenizer}


def _export_text_encoders(loaded, backend, writer: BundleWriter) -> dict | None:
    """Each text encoder present -> component of its folder's name; returns the manifest ``tokenizer``.

    One tokenizer: ``{"kind", "path"}``. Several (SD3): the first encoder's, with the others under
    ``"extra"``, keyed by folder: ``{"kind", "path": "tokenizer", "extra": {"tokenizer_2": {...}}}``.
    """
    tokenizers = {}
    for slot in _text_encoder_slots(loaded):
        encoder, kwargs = _component(backend, "text_encoder", *_open_text_encoder(loaded, slot))
        if slot.name == "text_encoder":  # backends written before SD3 take no name
            backend.text_encoder(encoder, writer, **kwargs)
        else:
            backend.text_encoder(encoder, writer, name=slot.name, **kwargs)
        del encoder, kwargs
        gc.collect()
        tokenizers[slot.tokenizer] = _copy_tokenizer(loaded, writer, slot)
    if not tokenizers:
        return None
    first, *rest = tokenizers.values()
    return {**first, "extra": {t["path"]: t for t in rest}} if rest else first


def _scheduler(loaded) -> dict:
    sched_dir = _pipeline_part(loaded, "scheduler")
    if sched_dir is not None and (sched_dir / "scheduler_config.json").is_file():
        config = json.loads((sched_dir / "scheduler_config.json").read_text())
    elif loaded.kind == "sd3":
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    else:  # PixArt-Sigma's and DiT's training schedule, sampled with DPM-Solver++ 2M
        config = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                  "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "solver_order": 2}
    # diffusers writes "no clipping" as -Infinity, which JSON (and the manifest) cannot hold: absent means the same.
    config = {k: v for k, v in config.items() if not (isinstance(v, float) and not math.isfinite(v))}
    return {"type": config.get("_class_name", "DPMSolverMultistepScheduler"), "config": config}


def _model_section(loaded, vae, text_max_length: int) -> dict:
    from litedge.export.specs import vae_scale_factor

    cfg = loaded.transformer.config
    base = BASE_DEFAULTS[loaded.kind]
    latent = int(cfg.in_channels)
    vae_config = None if vae is None else dict(vae.config, _class_name=type(vae).__name__)
    section = {
        "family": loaded.family, "task": base["task"], "base": base["base"],
        "latent_channels": latent, "patch_size": int(cfg.patch_size), "sample_size": int(cfg.sample_size),
        "prediction_type": "flow" if loaded.kind == "sd3" else "epsilon",
        "learned_sigma": int(cfg.out_channels or latent) == 2 * latent,
        "text_max_length": text_max_length,
        "vae_scale_factor": 8 if vae_config is None else vae_scale_factor(vae_config),
    }
    if vae is not None:
        section["vae_scaling_factor"] = float(vae.config.scaling_factor)
    if loaded.kind == "dit":
        section["num_classes"] = int(cfg.num_embeds_ada_norm)
    if loaded.kind == "sd3":
        section["clip_max_length"] = _clip_max_length(loaded)
        section["joint_attention_dim"] = int(cfg.joint_attention_dim)  # T5 width; zeros of it without T5
    return section


def _clip_max_length(loaded) -> int:
    """CLIP's prompt tokens: the tokenizer's ``model_max_length`` (77 in SD3), as diffusers pads to."""
    config = _pipeline_part(loaded, "tokenizer")
    config = config / "tokenizer_config.json" if config is not None else None
    if config is not None and config.is_file():
        length = json.loads(config.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 100_000:
            return length
    return 77


def export_bundle(cfg: ExportConfig) -> ExportReport:
    """Export a model to a bundle for ``cfg.target``; returns the report (also in the manifest).

    Raises:
        LitedgeError: bad target, weights or sizes, a source that is not a model, an
            existing ``out`` without ``force``, an unwritable folder, or a failed parity check.
            Nothing is left at ``cfg.out`` then.
    """
    target = get_target(cfg.target)
    text_weights = target.check_weights(cfg.text_encoder_weights) if cfg.text_encoder_weights else None
    options = BackendOptions(weights=target.check_weights(cfg.weights), sizes=cfg.sizes, keep_fp=cfg.keep_fp,
                             soc=cfg.soc, hub_device=cfg.hub_device, text_max_length=cfg.text_max_length,
                             text_encoder_weights=text_weights, vae_scale_factor=_source_vae_factor(cfg))
    report = ExportReport(path=Path(cfg.out))
    backend = load_backend(target, options, report)
    writer = BundleWriter(cfg.out, force=cfg.force)
    with _scratch(Path(cfg.out)) as workdir, _resources_as_errors(Path(cfg.out)):
        return _export(cfg, target, options, report, backend, writer, workdir)


@contextlib.contextmanager
def _scratch(out: Path):
    """A hidden work folder beside the output (random pipelines), removed however the export ends."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _resources_as_errors(out: Path):
    """Out of memory or disk space mid-export -> one LitedgeError (the temporary folders are removed on the way out)."""
    try:
        yield
    except MemoryError:
        raise LitedgeError(
            f"out of memory while exporting to {out}: close other programs, or export on a machine with more RAM "
            "(lit-info on a bundle of the same config says what it needs)"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(out.parent).free / 1e9
            raise LitedgeError(
                f"out of disk space while exporting to {out} ({free:.1f} GB free now): free space or choose another -o"
            ) from None
        raise


def _check_sizes(sizes: tuple[int, ...], patch_size: int, factor: int = 8) -> None:
    multiple = factor * int(patch_size)
    bad = [s for s in sizes if s <= 0 or s % multiple]
    if bad:
        raise LitedgeError(f"--sizes {','.join(map(str, bad))}: image sizes must be positive multiples of {multiple} "
                           f"(VAE factor {factor} x patch size)")


def _export(cfg, target, options, report, backend, writer, workdir: Path) -> ExportReport:
    if cfg.config_name is not None:  # before building anything
        from litedge.models.configs import get_config

        _check_sizes(cfg.sizes, get_config(cfg.config_name).teacher_config["patch_size"])
    loaded = _load(cfg, workdir)
    _check_sizes(cfg.sizes, loaded.transformer.config.patch_size, options.vae_scale_factor)
    trained_sizes = _trained_sizes(cfg, loaded, options.vae_scale_factor)  # refused before any export work
    native = _native_size(cfg, loaded, options.vae_scale_factor)
    _check_vae_latents(loaded)
    base = BASE_DEFAULTS[loaded.kind]
    with writer:
        transformer, kwargs = _component(backend, "transformer", loaded.transformer, loaded.weights)
        backend.transformer(transformer, writer, **kwargs)
        del kwargs
        gc.collect()
        vae, vae_weights = _open_vae(loaded)
        if vae is not None:
            vae, kwargs = _component(backend, "vae_decoder", vae, vae_weights)
            backend.vae_decoder(vae, writer, **kwargs)
        tokenizer = _export_text_encoders(loaded, backend, writer)
        backend.finish(writer)
        model_section = _model_section(loaded, vae, cfg.text_max_length or base["text_max_length"])
        model_section.update(trained_sizes=trained_sizes, native_size=native)
        # The model's native resolution (by default latent sample_size x the VAE's own factor: f8 usual,
        # f32 DC-AE); a static bundle without a graph at that size defaults to its first --sizes bucket.
        size = cfg.sizes[0] if cfg.sizes and native not in cfg.sizes else native
        writer.set(
            model=model_section,
            target={"name": target.name, "format": target.format, "providers": list(target.providers),
                    "precision": target.precision,
                    "weights": "int4-block32" if options.weights == "int4" else options.weights},
            tokenizer=tokenizer,
            scheduler=_scheduler(loaded),
            defaults={"steps": cfg.steps or base["steps"], "height": size, "width": size,
                      "guidance_scale": base["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale},
            fidelity=report.fidelity,
        )
        stage("writing manifest")
    stage(f"wrote {cfg.out}")
    return report
