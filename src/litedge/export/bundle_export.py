"""export_bundle(): a model source -> a ``NAME.litedge`` bundle for one target.

The steps are always the same: load the model (or build a named architecture with random
weights), export each component with its parity check, quantize weights, copy the
tokenizer and scheduler config, and let :class:`litedge.bundle.BundleWriter` hash every
file, write the manifest last and move the finished bundle into place.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from litedge import __version__
from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.targets import TargetProfile, get_target

# Defaults of the base pipelines (diffusers' PixArtSigmaPipeline / StableDiffusion3Pipeline).
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
        force: replace an existing bundle at ``out``.
    """

    out: Path
    source: Path | None = None
    config_name: str | None = None
    target: str = "cpu"
    weights: str | None = None
    sizes: tuple[int, ...] = ()
    keep_fp: tuple[str, ...] = ()
    force: bool = False
    text_max_length: int | None = None


@dataclass
class ExportReport:
    """What was written: the bundle path, per-component fidelity and quantization figures."""

    path: Path
    fidelity: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)


def _stage(message: str) -> None:
    print(f"lit-export: {message}", file=sys.stderr, flush=True)


def _check_sizes(sizes: tuple[int, ...], multiple: int) -> None:
    bad = [s for s in sizes if s <= 0 or s % multiple]
    if bad:
        raise LitedgeError(
            f"--sizes {','.join(map(str, bad))}: image sizes must be positive multiples of {multiple} "
            "(VAE factor x patch size)"
        )


def _load(cfg: ExportConfig):
    from litedge.models.configs import build_model, get_config
    from litedge.models.linearize import TEACHER_KINDS, linearize_config_of
    from litedge.models.loading import LoadedModel, load_model

    if cfg.config_name is not None:
        spec = get_config(cfg.config_name)
        model = build_model(cfg.config_name)
        return LoadedModel(model, TEACHER_KINDS[spec.teacher_class], linearize_config_of(model), source=spec.name)
    if cfg.source is None:
        raise LitedgeError("nothing to export: give a SOURCE, or --config NAME --random-weights")
    return load_model(cfg.source)


def _pipeline_part(loaded, name: str) -> Path | None:
    if loaded.pipeline_dir is None:
        return None
    part = loaded.pipeline_dir / name
    return part if part.is_dir() else None


def _export_transformer(loaded, writer: BundleWriter, target: TargetProfile, weights: str, cfg: ExportConfig,
                        report: ExportReport) -> None:
    from litedge.export.onnx_export import export_transformer

    model = loaded.transformer
    _stage(f"transformer ({type(model).__name__}, {loaded.family}): export to ONNX, parity check")
    # An int4 export quantizes an fp32 intermediate; external data keeps the name it was written with.
    fp_path = writer.path / ("transformer.fp32.onnx" if weights == "int4" else "transformer.onnx")
    result = export_transformer(model, fp_path, opset=target.opset)
    report.fidelity["transformer"] = {**result.fidelity, "vs": "torch-fp32"}
    files = result.files
    quant_meta = {}
    if weights == "int4":
        _stage("transformer: 4-bit weights (MatMulNBits, block 32, symmetric)")
        from litedge.export.onnx_io import model_files
        from litedge.quantize.int4 import quantize_int4

        quant = quantize_int4(fp_path, writer.path / "transformer.onnx", exclude=cfg.keep_fp,
                              check_inputs=result.sample_inputs)
        quant_meta = {
            "block_size": quant.block_size, "symmetric": quant.symmetric, "quantized": len(quant.quantized),
            "left_fp32": quant.left_fp32, "size_before": quant.size_before, "size_after": quant.size_after,
        }
        report.quantization["transformer"] = quant_meta
        report.fidelity["transformer_int4"] = quant.fidelity or {}
        _stage(f"transformer: {quant.summary()}")
        for path in files:
            path.unlink()
        files = model_files(quant.path)
    main = files[0]
    writer.add_component(
        "transformer", main.name, inputs=result.inputs, outputs=result.outputs, shapes="dynamic",
        extra_files=[p.name for p in files[1:]],
        meta={"weights": weights, **result.metadata, **({"quantization": quant_meta} if quant_meta else {})},
    )


def _export_vae(loaded, writer: BundleWriter, target: TargetProfile, report: ExportReport) -> dict | None:
    from diffusers import AutoencoderKL

    from litedge.export.onnx_export import export_vae_decoder

    vae_dir = _pipeline_part(loaded, "vae")
    if vae_dir is None:
        _stage("no vae/ in the source: the bundle will hold the transformer only (enough for lit-profile)")
        return None
    _stage("vae_decoder: export to ONNX, parity check")
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    result = export_vae_decoder(vae, writer.path / "vae_decoder.onnx", opset=target.opset)
    report.fidelity["vae_decoder"] = {**result.fidelity, "vs": "torch-fp32"}
    writer.add_component("vae_decoder", result.path.name, inputs=result.inputs, outputs=result.outputs,
                         shapes="dynamic", extra_files=[p.name for p in result.files[1:]], meta=result.metadata)
    return dict(vae.config)


def _export_text(loaded, writer: BundleWriter, target: TargetProfile, report: ExportReport) -> dict | None:
    encoder_dir, tokenizer_dir = _pipeline_part(loaded, "text_encoder"), _pipeline_part(loaded, "tokenizer")
    if loaded.kind != "pixart":
        return None
    if encoder_dir is None or tokenizer_dir is None:
        _stage("no text_encoder/ + tokenizer/ in the source: the bundle will have no text encoder")
        return None
    from transformers import T5EncoderModel

    from litedge.export.onnx_export import export_text_encoder

    _stage("text_encoder (T5): export to ONNX, parity check")
    encoder = T5EncoderModel.from_pretrained(encoder_dir, use_safetensors=True).eval()
    result = export_text_encoder(encoder, writer.path / "text_encoder.onnx", opset=target.opset)
    report.fidelity["text_encoder"] = {**result.fidelity, "vs": "torch-fp32"}
    writer.add_component("text_encoder", result.path.name, inputs=result.inputs, outputs=result.outputs,
                         shapes="dynamic", extra_files=[p.name for p in result.files[1:]], meta=result.metadata)
    shutil.copytree(tokenizer_dir, writer.path / "tokenizer")
    kind = "tokenizers" if (tokenizer_dir / "tokenizer.json").is_file() else "sentencepiece"
    return {"kind": kind, "path": "tokenizer"}


def _scheduler(loaded) -> dict:
    sched_dir = _pipeline_part(loaded, "scheduler")
    if sched_dir is not None and (sched_dir / "scheduler_config.json").is_file():
        config = json.loads((sched_dir / "scheduler_config.json").read_text())
    elif loaded.kind == "sd3":
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    else:  # PixArt-Sigma's and DiT's training schedule, sampled with DPM-Solver++ 2M
        config = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                  "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "solver_order": 2}
    return {"type": config.get("_class_name", "DPMSolverMultistepScheduler"), "config": config}


def _model_section(loaded, vae_config: dict | None, text_max_length: int) -> dict:
    cfg = loaded.transformer.config
    base = BASE_DEFAULTS[loaded.kind]
    latent = int(cfg.in_channels)
    section = {
        "family": loaded.family, "task": base["task"], "base": base["base"],
        "latent_channels": latent, "patch_size": int(cfg.patch_size),
        "sample_size": int(cfg.sample_size),
        "prediction_type": "flow" if loaded.kind == "sd3" else "epsilon",
        "learned_sigma": int(cfg.out_channels or latent) == 2 * latent,
        "text_max_length": text_max_length,
    }
    if vae_config is not None:
        section["vae_scale_factor"] = 2 ** (len(vae_config["block_out_channels"]) - 1)
        section["vae_scaling_factor"] = float(vae_config["scaling_factor"])
    else:
        section["vae_scale_factor"] = 8
    if loaded.kind == "dit":
        section["num_classes"] = int(cfg.num_embeds_ada_norm)
    return section


def export_bundle(cfg: ExportConfig, *, on_stage: Callable[[str], None] | None = None) -> ExportReport:
    """Export a model to a bundle for ``cfg.target``; returns the report (also in the manifest).

    Raises:
        LitedgeError: bad target, weights or sizes, a source that is not a model, an
            existing ``out`` without ``force``, an unwritable folder, or a failed parity check.
            Nothing is left at ``cfg.out`` then.
    """
    target = get_target(cfg.target)
    weights = target.check_weights(cfg.weights)
    if target.name != "cpu":
        raise LitedgeError(f"target {target.name} is not implemented yet in litedge {__version__}: use --target cpu")
    writer = BundleWriter(cfg.out, force=cfg.force)
    loaded = _load(cfg)
    _check_sizes(cfg.sizes, 8 * int(loaded.transformer.config.patch_size))
    report = ExportReport(path=Path(cfg.out))
    base = BASE_DEFAULTS[loaded.kind]
    with writer:
        _export_transformer(loaded, writer, target, weights, cfg, report)
        vae_config = _export_vae(loaded, writer, target, report)
        tokenizer = _export_text(loaded, writer, target, report)
        text_max_length = cfg.text_max_length or base["text_max_length"]
        size = (cfg.sizes[0] if cfg.sizes else int(loaded.transformer.config.sample_size) * 8)
        writer.set(
            model=_model_section(loaded, vae_config, text_max_length),
            target={"name": target.name, "format": target.format, "providers": list(target.providers),
                    "precision": target.precision, "weights": "int4-block32" if weights == "int4" else weights},
            tokenizer=tokenizer,
            scheduler=_scheduler(loaded),
            defaults={"steps": base["steps"], "guidance_scale": base["guidance_scale"], "height": size, "width": size},
            fidelity=report.fidelity,
        )
        _stage("writing manifest")
    _stage(f"wrote {cfg.out}")
    return report
