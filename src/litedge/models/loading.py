"""One entry point for every checkpoint a user may hold: :func:`load_model`.

Accepted sources:
- a diffusers pipeline directory (``model_index.json``, ``transformer/``, ``vae/``, ...),
  teacher or litedge student;
- a diffusers transformer directory (``config.json`` + safetensors);
- a single ``.safetensors`` file, diffusers or original layout;
- an original PixArt-Sigma / DiT / LiT ``.pth`` (``state_dict`` / ``state_dict_ema``
  nesting), read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from litedge.errors import LitedgeError
from litedge.models import original_checkpoints as original
from litedge.models.configs import CONFIGS, get_config
from litedge.models.linearize import TEACHER_KINDS, LinearizeConfig, linearize_config_of, teacher_kind
from litedge.models.student import (
    CONFIG_NAME, LITEDGE_KEY, build_from_config, load_state_dict_checked, load_transformer,
)
from litedge.models.weights import SafetensorsWeights, WeightSource, empty_weights, placeholder_parameters

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    """What :func:`load_model` found.

    Attributes:
        transformer: the diffusers transformer (a student is already linearized), eval mode.
        kind: "pixart", "dit" or "sd3".
        linear: how its attention was linearized; None for a softmax teacher.
        pipeline_dir: the pipeline directory holding vae/, text_encoder/, tokenizer/,
            scheduler/ when the source was one; None for a lone transformer.
        extras: non-transformer tensors from an original checkpoint, e.g.
            ``null_caption_embedding`` (L, D): PixArt's learned empty-prompt embedding.
        source: the path it was loaded from.
    """

    transformer: nn.Module
    kind: str
    linear: LinearizeConfig | None
    pipeline_dir: Path | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    # Set when the transformer is a skeleton (placeholder weights, see litedge.models.weights): its
    # weights are read from here one tensor at a time. None: the transformer holds its weights.
    weights: WeightSource | None = None

    @property
    def family(self) -> str:
        return self.linear.family if self.linear else "softmax"


def _config_from_name_or_file(config: str | os.PathLike | dict) -> dict:
    """A diffusers config dict from a named config, a config.json path, or a dict."""
    if isinstance(config, dict):
        return dict(config)
    if str(config) in CONFIGS:
        spec = get_config(str(config))
        return {**spec.teacher_config, "_class_name": spec.teacher_class}
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise LitedgeError(f"config {config!r} is neither a named config ({', '.join(CONFIGS)}) nor a config.json")
    return json.loads(path.read_text())


def _load_single_file(path: Path, config, prefer_ema: bool, num_heads: int | None) -> LoadedModel:
    state = original.read_checkpoint(path, prefer_ema=prefer_ema)
    converted = original.convert_to_diffusers(state)
    if config is not None:
        cfg = _config_from_name_or_file(config)
    else:
        cfg = original.infer_config(
            converted.state_dict, converted.layout, num_attention_heads=num_heads, extras=converted.extras
        )
    if converted.linear is not None and LITEDGE_KEY not in cfg:
        cfg[LITEDGE_KEY] = converted.linear
    model = build_from_config(cfg)
    load_state_dict_checked(model, converted.state_dict, str(path))
    return LoadedModel(
        transformer=model.eval(), kind=TEACHER_KINDS[type(model).__name__], linear=linearize_config_of(model),
        extras=converted.extras, source=str(path),
    )


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LitedgeError(f"{directory} has no {CONFIG_NAME}: expected a diffusers model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LitedgeError(f"{path}: not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise LitedgeError(f"{path}: expected a JSON object of model settings, got {type(config).__name__}")
    return config


def open_transformer(directory: str | os.PathLike) -> tuple[nn.Module, SafetensorsWeights]:
    """A transformer directory as a skeleton (placeholder weights) and its lazily read weights.

    Nothing is loaded: peak memory is the skeleton's buffers. Use with
    :func:`litedge.models.weights.streamed_weights` or ``materialize``.
    """
    directory = Path(directory)
    config = _read_config(directory)
    weights = SafetensorsWeights(directory)
    try:
        with empty_weights():
            model = build_from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise LitedgeError(f"{directory / CONFIG_NAME}: settings the model class does not accept ({exc})") from None
    return placeholder_parameters(model).eval(), weights


def open_text_encoder(folder: str | os.PathLike, class_name: str) -> tuple[nn.Module, SafetensorsWeights]:
    """A transformers text encoder folder (T5EncoderModel, CLIPTextModelWithProjection) as a skeleton + lazy weights."""
    import transformers

    folder = Path(folder)
    cls = getattr(transformers, class_name)
    weights = SafetensorsWeights(folder)
    try:
        config = cls.config_class.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LitedgeError(f"{folder}/config.json: not a {class_name} config ({exc})") from None
    with empty_weights():
        encoder = cls(config)
    return placeholder_parameters(encoder).eval(), weights


def open_model(source: str | os.PathLike, **kwargs) -> LoadedModel:
    """Like :func:`load_model`, but a directory's transformer is a skeleton with ``weights`` to stream from.

    Single files (``.safetensors``, ``.pth``) are loaded whole, as :func:`load_model` does.
    """
    path = Path(source)
    if path.is_dir() and ((path / "model_index.json").is_file() or (path / CONFIG_NAME).is_file()):
        pipeline_dir = path if (path / "model_index.json").is_file() else None
        transformer_dir = path / "transformer" if pipeline_dir is not None else path
        if pipeline_dir is not None and not transformer_dir.is_dir():
            raise LitedgeError(f"{path}: pipeline directory without a transformer/ subfolder")
        model, weights = open_transformer(transformer_dir)
        return LoadedModel(
            transformer=model, kind=teacher_kind(model), linear=linearize_config_of(model),
            pipeline_dir=pipeline_dir, source=str(path), weights=weights,
        )
    return load_model(source, **kwargs)


def load_model(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | dict | None = None,
    prefer_ema: bool = False,
    num_heads: int | None = None,
) -> LoadedModel:
    """Load a teacher or student transformer from any supported source.

    Args:
        source: pipeline directory, transformer directory, ``.safetensors`` or original ``.pth``.
        config: for single files only: a named config (e.g. "LiT-T2I-XL"), a config.json
            or a dict; by default the architecture is inferred from the tensor shapes.
        prefer_ema: for original checkpoints holding both, take ``state_dict_ema``.
        num_heads: softmax heads of an original checkpoint (shapes cannot tell them).

    Raises:
        LitedgeError: a missing path, an unsafe or corrupt file, weights that do not fit.
    """
    path = Path(source)
    if not path.exists():
        raise LitedgeError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            if not (path / "transformer").is_dir():
                raise LitedgeError(f"{path}: pipeline directory without a transformer/ subfolder")
            model, pipeline_dir = load_transformer(path / "transformer"), path
        elif (path / CONFIG_NAME).is_file():
            model, pipeline_dir = load_transformer(path), None
        else:
            raise LitedgeError(
                f"{path}: not a model directory (expected model_index.json or config.json in it)"
            )
        return LoadedModel(
            transformer=model, kind=TEACHER_KINDS[type(model).__name__], linear=linearize_config_of(model),
            pipeline_dir=pipeline_dir, source=str(path),
        )
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise LitedgeError(
            f"{path}: unsupported file type {path.suffix!r}: expected a directory or one of {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    return _load_single_file(path, config, prefer_ema, num_heads)
