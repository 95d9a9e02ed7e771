"""Saving and loading transformers (teachers and students) in diffusers' directory layout.

A student is saved the way its teacher came: ``config.json`` (the teacher's diffusers
config plus a ``litedge`` section describing the linear attention) next to
``diffusion_pytorch_model.safetensors``. Its ``_class_name`` is the litedge subclass of the
teacher's class (``LitedgePixArtTransformer2DModel``, see ``litedge.models.student_classes``),
so diffusers' ``from_pretrained`` builds the linear attention too; a pipeline's
``model_index.json`` names it as ``["litedge", CLASS]`` (:func:`student_model_index`).

Folders written before that (the teacher's class name and a ``_litedge`` section) still load
here. Directories are written to a temporary sibling and renamed into place, so an
interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from litedge.atomic import atomic_directory
from litedge.errors import LitedgeError
from litedge.models.weights import _inside
from litedge.models.linearize import (
    STUDENT_CLASS_NAMES, TEACHER_KINDS, LinearizeConfig, diffusers_class_name, linearize_, linearize_config_of,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LITEDGE_KEY = "_litedge"  # a student's linear attention in older folders and in inferred configs
STUDENT_CONFIG_KEY = "litedge"  # the same, as the litedge student classes' config field
_STUDENT_TO_TEACHER = {student: teacher for teacher, student in STUDENT_CLASS_NAMES.items()}


def model_config(model: nn.Module) -> dict:
    """The diffusers config of a transformer; a student's names its litedge class and adds ``litedge``."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != STUDENT_CONFIG_KEY}
    base = diffusers_class_name(model) or type(model).__name__
    lin = linearize_config_of(model)
    config["_class_name"] = STUDENT_CLASS_NAMES.get(base, base) if lin is not None else base
    if lin is not None:
        config[STUDENT_CONFIG_KEY] = lin.to_json()
    return config


def model_index_entry(model: nn.Module) -> list[str]:
    """``[library, class]`` of ``model`` for a pipeline's model_index.json: ``["litedge", ...]`` for a student."""
    class_name = model_config(model)["_class_name"]
    return ["litedge" if class_name in _STUDENT_TO_TEACHER else "diffusers", class_name]


def student_model_index(index: dict, model: nn.Module) -> dict:
    """A copy of a pipeline's model_index.json whose ``transformer`` entry names ``model``'s class.

    Write it next to ``transformer/`` saved by :func:`save_transformer`: with a student's
    ``["litedge", "Litedge...Transformer2DModel"]`` entry, ``DiffusionPipeline.from_pretrained``
    builds the student (after ``import litedge``) and never softmax attention with random weights.
    """
    return {**index, "transformer": model_index_entry(model)}


def save_transformer(model: nn.Module, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``config.json`` + safetensors weights to ``out_dir`` atomically; returns the path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not force:
        raise LitedgeError(f"{out} exists: pass force=True (--force) to overwrite it")
    with atomic_directory(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model_config(model), indent=2, default=list))
    return out


def read_safetensors_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Weights of a diffusers model directory: one safetensors file or an index of shards."""
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(_inside(directory, shard))))
        return state
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise LitedgeError(f"{directory} has no {WEIGHTS_NAME}: expected a diffusers model directory")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise LitedgeError(f"{path}: not a readable safetensors file ({exc}); re-save or re-download it") from None


def build_from_config(config: dict) -> nn.Module:
    """An untrained transformer from a saved config (a student is linearized the same way).

    Accepts a teacher's diffusers config, a student's (litedge class name + ``litedge``) and
    the older student form (diffusers class name + ``_litedge``). The model is an instance
    of the diffusers class either way, as :func:`litedge.models.linearize.linearize` makes it.
    """
    import diffusers

    if not isinstance(config, dict):  # a config.json holding a list or a number (issue 17)
        raise LitedgeError(f"a transformer config must be a JSON object of settings, got {type(config).__name__}; "
                           "fix or re-download its config.json")
    config = dict(config)
    class_name = config.pop("_class_name", None)
    new_lin = config.pop(STUDENT_CONFIG_KEY, None)
    old_lin = config.pop(LITEDGE_KEY, None)
    lin = new_lin if new_lin is not None else old_lin
    if class_name in _STUDENT_TO_TEACHER:
        if lin is None:
            raise LitedgeError(
                f"config names the student class {class_name} but has no {STUDENT_CONFIG_KEY!r} section: "
                "re-save the student with litedge"
            )
        class_name = _STUDENT_TO_TEACHER[class_name]
    if class_name not in TEACHER_KINDS:
        raise LitedgeError(
            f"config names model class {class_name!r}: expected one of {sorted([*TEACHER_KINDS, *_STUDENT_TO_TEACHER])}"
        )
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = getattr(diffusers, class_name).from_config(config)
    if lin is not None:
        linearize_(model, LinearizeConfig.from_json(lin))
    return model


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one clear line for missing, unexpected or misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {label} ({shown})")
    if problems:
        raise LitedgeError(
            f"{source}: weights do not fit the {type(model).__name__} config: {'; '.join(problems)}; "
            "check that the config and the weights come from the same model"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_transformer(directory: str | os.PathLike) -> nn.Module:
    """Load a transformer directory written by :func:`save_transformer` or by diffusers.

    Returns the model in eval mode; a student comes back linearized as it was saved.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise LitedgeError(f"{directory} has no {CONFIG_NAME}: expected a diffusers transformer directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LitedgeError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    model = build_from_config(config)
    load_state_dict_checked(model, read_safetensors_weights(directory), str(directory))
    return model.eval()
