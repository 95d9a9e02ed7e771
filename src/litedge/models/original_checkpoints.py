"""Read original-repo checkpoints safely and map them onto diffusers' transformers.

Covers PixArt-alpha / PixArt-Sigma ``.pth`` (github PixArt-alpha), DiT ``.pt`` (github
facebookresearch/DiT) and LiT ``.pth`` (those two with each block's ``attn`` replaced by a
linear attention with ``attn.q``, ``attn.kv``, ``attn.dwc``, ``attn.proj``). Files are read
with ``torch.load(weights_only=True)`` or safetensors only: a file that needs arbitrary
unpickling is refused, never executed.

Example::

    sd = read_checkpoint("PixArt-Sigma-XL-2-1024-MS.pth")
    conv = convert_to_diffusers(sd)                      # ConvertedCheckpoint
    config = infer_config(conv.state_dict, extras=conv.extras)  # diffusers config (+ "_litedge" for LiT)
    model = litedge.models.student.build_from_config(config)
    model.load_state_dict(conv.state_dict, strict=True)
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from litedge.errors import LitedgeError

Layout = Literal[
    "diffusers-pixart", "diffusers-dit", "diffusers-sd3", "original-pixart", "original-dit", "litedge-student"
]
Family = Literal["softmax", "lit", "edit", "mmedit"]
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
EMA_KEYS = ("state_dict_ema", "ema", "model_ema")
MAIN_KEYS = ("state_dict", "model", "module")
# DiT training checkpoints carry their argparse arguments; a Namespace only holds attributes.
SAFE_EXTRA_GLOBALS = [argparse.Namespace]


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike, *, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth/.pt/.bin/.ckpt`` (weights-only unpickling) or ``.safetensors`` file.

    Wrappers are unwrapped: ``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``
    (or, with ``prefer_ema=True``, ``state_dict_ema`` / ``ema`` / ``model_ema``), nested
    or not; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) name parts are removed
    and non-tensor values dropped. A flat state dict is returned as it is, whatever
    ``prefer_ema`` says (released weights are usually the EMA ones already).

    Returns:
        ``{name: tensor}`` on the CPU, dtypes as stored.

    Raises:
        LitedgeError: missing, truncated or corrupt file; a pickle that needs code to run
            (custom classes, functions); content that is not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise LitedgeError(f"{path}: no such file: expected a {'/'.join(TORCH_SUFFIXES)} or .safetensors checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj = _load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _load_torch(path)
    else:
        raise LitedgeError(
            f"{path}: unknown checkpoint suffix {suffix!r}: expected one of {', '.join(TORCH_SUFFIXES)}, .safetensors"
        )
    return _unwrap(obj, prefer_ema, str(path))


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_torch(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise LitedgeError(
                f"{path}: not a readable PyTorch checkpoint ({_one_line(exc)}); re-download or re-save it"
            ) from None
        found = re.findall(r"GLOBAL (\S+)", str(exc))
        what = f"it pickles {found[0]}" if found else "it pickles Python objects"
        raise LitedgeError(
            f"{path}: refused: loading it would run arbitrary code ({what}, not only tensors); "
            "re-save it as a plain state_dict or safetensors where you trust it: "
            "torch.save(model.state_dict(), 'weights.pth')"
        ) from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damaged bytes
        raise LitedgeError(
            f"{path}: truncated or corrupt PyTorch checkpoint ({type(exc).__name__}: {_one_line(exc, 100)}); "
            "re-download or re-save it"
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LitedgeError(
            f"{path}: truncated or corrupt safetensors file ({_one_line(exc, 100)}); re-download or re-save it"
        ) from None


def _wrapper_key(obj: Mapping, prefer_ema: bool, source: str) -> str | None:
    """The entry of a training checkpoint that holds the weights; None for a flat state dict."""
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if prefer_ema:
        for key in EMA_KEYS:
            if key in nested:
                return key
        if any(key in nested for key in MAIN_KEYS):
            raise LitedgeError(
                f"{source}: no EMA weights (none of {', '.join(EMA_KEYS)}; entries: {', '.join(map(str, obj))}); "
                "pass prefer_ema=False to read the training weights"
            )
    return next((key for key in MAIN_KEYS if key in nested), None)


def _clean_name(key: str) -> str:
    """Drop torch.compile's ``_orig_mod`` parts and DDP's leading ``module`` parts."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def _unwrap(obj: object, prefer_ema: bool, source: str) -> dict[str, torch.Tensor]:
    for _ in range(4):  # wrappers nest at most a few levels ({"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            raise LitedgeError(f"{source}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
        key = _wrapper_key(obj, prefer_ema, source)
        if key is None:
            break
        obj = obj[key]
    tensors = {_clean_name(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        shown = ", ".join(map(str, list(obj)[:6]))
        raise LitedgeError(f"{source}: no tensors found (entries: {shown or 'none'}); expected a state_dict")
    if len(tensors) != sum(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LitedgeError(
            f"{source}: names collide once 'module.'/'_orig_mod.' are removed; re-save a plain state_dict"
        )
    return tensors


# ----------------------------------------------------------------------------- detection


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> Family:
    """"lit" (depthwise conv ``attn.dwc`` / ``attn1.dwc``), "edit"/"mmedit" (ConvFusion), else "softmax"."""
    keys = list(state_dict)
    if any(re.search(r"\.attn1?\.dwc\.", k) for k in keys):
        return "lit"
    if any(re.search(r"\.attn\d?\.(fusion|compressor)\.", k) for k in keys):
        return "mmedit" if any(k.startswith("context_embedder.") for k in keys) else "edit"
    return "softmax"


def _diffusers_teacher(keys: set[str]) -> str | None:
    if any(k.startswith(("context_embedder.", "time_text_embed.")) for k in keys):
        return "sd3"
    if any(k.startswith("adaln_single.") for k in keys):
        return "pixart"
    if "proj_out_1.weight" in keys or any(".norm1.emb." in k for k in keys):
        return "dit"
    return None


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    """Which model and naming a state dict uses, from its key names alone.

    ``litedge-student``: diffusers names with a linear self-attention (see :func:`detect_family`).
    An original LiT checkpoint is ``original-pixart`` / ``original-dit`` with family "lit".
    """
    keys = set(state_dict)
    if any(k.startswith("transformer_blocks.") for k in keys):
        teacher = _diffusers_teacher(keys)
        if teacher is not None:
            student = detect_family(state_dict) != "softmax"
            return "litedge-student" if student else f"diffusers-{teacher}"  # type: ignore[return-value]
    if any(k.startswith("blocks.") for k in keys):
        if "t_block.1.weight" in keys or any(k.startswith("y_embedder.y_proj.") or ".cross_attn." in k for k in keys):
            return "original-pixart"
        if "y_embedder.embedding_table.weight" in keys or any(".adaLN_modulation." in k for k in keys):
            return "original-dit"
    shown = ", ".join(sorted(keys)[:4])
    raise LitedgeError(
        f"unrecognised checkpoint layout (keys {shown}, ...): expected a PixArt, DiT or SD3 transformer "
        "in diffusers or original-repo naming"
    )


# ----------------------------------------------------------------------------- mapping tables

# original name prefix -> diffusers prefix, or several: the original tensor is their
# concatenation along dim 0 (fused qkv / kv projections), in this order.
Target = str | tuple[str, ...]


@dataclass(frozen=True)
class _Mapping:
    top: dict[str, Target]
    block: dict[str, Target]  # inside blocks.N. / transformer_blocks.N.
    extras: dict[str, str]  # original buffers that are not diffusers weights -> extras name
    shared: str | None = None  # diffusers per-block copies of top-level weights (DiT's norm1.emb)


_SOFTMAX_SELF_ATTN: dict[str, Target] = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),  # (3C, C) = [q; k; v]
    "attn.proj": "attn1.to_out.0",
}
_LINEAR_SELF_ATTN: dict[str, Target] = {"attn": "attn1"}  # LiT / EDiT modules keep their own sub-names
_MLP: dict[str, Target] = {"mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}

PIXART = _Mapping(
    top={
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",  # PixArt-alpha micro-conditions
        "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
        "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
        "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
        "final_layer.scale_shift_table": "scale_shift_table",
        "final_layer.linear": "proj_out",
    },
    block={
        "scale_shift_table": "scale_shift_table",
        "cross_attn.q_linear": "attn2.to_q",
        "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
        "cross_attn.proj": "attn2.to_out.0",
        **_MLP,
    },
    extras={"pos_embed": "pos_embed", "y_embedder.y_embedding": "null_caption_embedding"},
)

_DIT_EMB = "transformer_blocks.0.norm1.emb"
DIT = _Mapping(
    top={
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": f"{_DIT_EMB}.timestep_embedder.linear_1",
        "t_embedder.mlp.2": f"{_DIT_EMB}.timestep_embedder.linear_2",
        "y_embedder.embedding_table": f"{_DIT_EMB}.class_embedder.embedding_table",
        "final_layer.adaLN_modulation.1": "proj_out_1",  # (shift, scale) in both
        "final_layer.linear": "proj_out_2",
    },
    block={"adaLN_modulation.1": "norm1.linear", **_MLP},  # 6 chunks in the same order in both
    extras={"pos_embed": "pos_embed"},
    shared="norm1.emb",
)


@dataclass
class ConvertedCheckpoint:
    """An original checkpoint in diffusers naming.

    Attributes:
        state_dict: diffusers parameter names -> tensors, for ``load_state_dict(strict=True)``.
        extras: original buffers that diffusers recomputes or keeps elsewhere:
            ``null_caption_embedding`` (L, caption_channels), PixArt's unconditional caption;
            ``pos_embed`` (1, N, C), the fixed sin-cos position embedding.
        dropped: source names not carried over (unknown keys with ``strict=False``).
        layout: the source layout; family: "softmax", "lit", ...
        linear: the student's ``_litedge`` config (e.g. {"family": "lit", "heads": 2,
            "kernel_size": 5}) read from the weights; None for a softmax model.
    """

    state_dict: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    layout: str = ""
    family: str = "softmax"
    linear: dict | None = None


# ----------------------------------------------------------------------------- conversion


def _match(name: str, table: Mapping[str, Target]) -> tuple[str, Target, str] | None:
    """The longest table prefix that ``name`` starts with (whole dotted parts): (prefix, target, rest)."""
    best = None
    for prefix, target in table.items():
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, target, name[len(prefix):])
    return best


def _block_table(mapping: _Mapping, linear: bool) -> dict[str, Target]:
    return {**mapping.block, **(_LINEAR_SELF_ATTN if linear else _SOFTMAX_SELF_ATTN)}


def _split(name: str, tensor: torch.Tensor, targets: tuple[str, ...], rest: str) -> dict[str, torch.Tensor]:
    if tensor.shape[0] % len(targets):
        raise LitedgeError(f"{name}: dim 0 ({tensor.shape[0]}) does not split into {len(targets)} equal parts")
    return {t + rest: part.clone() for t, part in zip(targets, tensor.chunk(len(targets), dim=0))}


def _unknown(names: list[str], what: str) -> LitedgeError:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return LitedgeError(
        f"{len(names)} {what} keys litedge cannot map ({shown}): an unsupported variant "
        "(e.g. PixArt-Sigma KV compression, qk-norm)? pass strict=False to drop them"
    )


def _to_diffusers(sd: Mapping[str, torch.Tensor], mapping: _Mapping, layout: str, strict: bool) -> ConvertedCheckpoint:
    out = ConvertedCheckpoint({}, layout=layout, family=detect_family(sd))
    for name, tensor in sd.items():
        if name in mapping.extras:
            out.extras[mapping.extras[name]] = tensor
            continue
        block = re.match(r"blocks\.(\d+)\.(.+)$", name)
        if block:
            linear = f"blocks.{block[1]}.attn.qkv.weight" not in sd
            hit, prefix = _match(block[2], _block_table(mapping, linear)), f"transformer_blocks.{block[1]}."
        else:
            hit, prefix = _match(name, mapping.top), ""
        if hit is None:
            out.dropped.append(name)
        elif isinstance(hit[1], tuple):
            out.state_dict.update(_split(name, tensor, tuple(prefix + t for t in hit[1]), hit[2]))
        else:
            out.state_dict[prefix + hit[1] + hit[2]] = tensor
    if strict and out.dropped:
        raise _unknown(out.dropped, f"{layout}")
    if mapping.shared:
        _copy_shared(out.state_dict, mapping.shared)
    out.linear = _linear_of(out.state_dict)
    return out


def _copy_shared(sd: dict[str, torch.Tensor], shared: str) -> None:
    """Give every block its own copy of block 0's ``shared`` weights (diffusers' DiT layout)."""
    blocks = {int(m[1]) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    first = f"transformer_blocks.0.{shared}."
    for key in [k for k in sd if k.startswith(first)]:
        for i in sorted(blocks - {0}):
            sd[f"transformer_blocks.{i}.{shared}.{key[len(first):]}"] = sd[key].clone()


def _to_original(
    sd: Mapping[str, torch.Tensor], mapping: _Mapping, extras: Mapping[str, torch.Tensor] | None, strict: bool
) -> dict[str, torch.Tensor]:
    reverse_top = _reverse(mapping.top)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}  # fused original name -> {part index: tensor}
    unknown = []
    for name, tensor in sd.items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        hit = _match(name, reverse_top)
        prefix = ""
        if hit is None and block:
            if mapping.shared and block[2].startswith(mapping.shared + "."):
                _check_shared_copy(sd, name, block[1], mapping.shared)
                continue
            linear = f"transformer_blocks.{block[1]}.attn1.to_q.weight" not in sd
            hit, prefix = _match(block[2], _reverse(_block_table(mapping, linear))), f"blocks.{block[1]}."
        if hit is None:
            unknown.append(name)
            continue
        original, index = hit[1]
        if index < 0:
            out[prefix + original + hit[2]] = tensor
        else:
            parts.setdefault(prefix + original + hit[2], {})[index] = tensor
    if strict and unknown:
        raise _unknown(unknown, "diffusers")
    for name, pieces in parts.items():
        if sorted(pieces) != list(range(len(pieces))) or len(pieces) < 2:
            raise LitedgeError(f"{name}: some of its fused parts are missing: expected all of q/k/v (or k/v)")
        out[name] = torch.cat([pieces[i] for i in range(len(pieces))], dim=0)
    out.update(_extras_to_original(extras or {}, mapping))
    return out


def _reverse(table: Mapping[str, Target]) -> dict[str, tuple[str, int]]:
    """diffusers prefix -> (original prefix, part index or -1 for a plain rename)."""
    rev: dict[str, tuple[str, int]] = {}
    for original, target in table.items():
        if isinstance(target, tuple):
            rev.update({t: (original, i) for i, t in enumerate(target)})
        else:
            rev[target] = (original, -1)
    return rev


def _check_shared_copy(sd: Mapping[str, torch.Tensor], name: str, index: str, shared: str) -> None:
    first = name.replace(f"transformer_blocks.{index}.", "transformer_blocks.0.", 1)
    if first not in sd or not torch.equal(sd[first], sd[name]):
        raise LitedgeError(
            f"{name} differs from {first}: the original layout shares one embedder across blocks; "
            "copy block 0's norm1.emb into every block first"
        )


def _extras_to_original(extras: Mapping[str, torch.Tensor], mapping: _Mapping) -> dict[str, torch.Tensor]:
    reverse = {v: k for k, v in mapping.extras.items()}
    unknown = sorted(set(extras) - set(reverse))
    if unknown:
        raise LitedgeError(f"unknown extras {unknown}: expected some of {sorted(reverse)}")
    return {reverse[k]: v for k, v in extras.items()}


def original_pixart_to_diffusers(sd: Mapping[str, torch.Tensor], *, strict: bool = True) -> ConvertedCheckpoint:
    """PixArt-alpha/Sigma (or LiT-PixArt) original names -> ``PixArtTransformer2DModel`` names.

    ``blocks.N.attn.qkv`` (3C, C) becomes ``attn1.to_q/to_k/to_v`` (C, C) each and
    ``cross_attn.kv_linear`` (2C, C) ``attn2.to_k/to_v``; a block without ``attn.qkv``
    (LiT) keeps its self-attention sub-names under ``attn1``. ``pos_embed`` and
    ``y_embedder.y_embedding`` go to ``extras``. Unmapped keys raise unless ``strict=False``.
    """
    return _to_diffusers(sd, PIXART, "original-pixart", strict)


def diffusers_pixart_to_original(
    sd: Mapping[str, torch.Tensor], *, extras: Mapping[str, torch.Tensor] | None = None, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`original_pixart_to_diffusers`; ``extras`` (``pos_embed``,
    ``null_caption_embedding``) are written back under their original names."""
    return _to_original(sd, PIXART, extras, strict)


def original_dit_to_diffusers(sd: Mapping[str, torch.Tensor], *, strict: bool = True) -> ConvertedCheckpoint:
    """DiT (or LiT-DiT) original names -> ``DiTTransformer2DModel`` names.

    The shared ``t_embedder`` / ``y_embedder`` are copied into every block's ``norm1.emb``
    (diffusers keeps one per block and the final layer uses block 0's). ``pos_embed``
    (1, N, C) goes to ``extras``.

    Note: diffusers' DiT computes its timestep sinusoid with frequencies
    ``exp(-ln(1e4) * i / (128 - 1))`` where the original uses ``/ 128``: the same weights
    give slightly different outputs in the two codebases (a property of diffusers' model).
    """
    return _to_diffusers(sd, DIT, "original-dit", strict)


def diffusers_dit_to_original(
    sd: Mapping[str, torch.Tensor], *, extras: Mapping[str, torch.Tensor] | None = None, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`original_dit_to_diffusers`: block 0's embedders become the shared
    ones; the other blocks' copies must equal them (LitedgeError otherwise)."""
    return _to_original(sd, DIT, extras, strict)


def convert_to_diffusers(sd: Mapping[str, torch.Tensor], *, strict: bool = True) -> ConvertedCheckpoint:
    """Any supported layout -> diffusers names (diffusers layouts pass through unchanged)."""
    layout = detect_layout(sd)
    if layout == "original-pixart":
        return original_pixart_to_diffusers(sd, strict=strict)
    if layout == "original-dit":
        return original_dit_to_diffusers(sd, strict=strict)
    return ConvertedCheckpoint(dict(sd), layout=layout, family=detect_family(sd), linear=_linear_of(sd))


# ----------------------------------------------------------------------------- config

# What infer_config reads: (original name, diffusers name) per model.
_PROBES = {
    "pixart": {"patch": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
               "final": ("final_layer.linear.weight", "proj_out.weight"),
               "caption": ("y_embedder.y_proj.fc1.weight", "caption_projection.linear_1.weight"),
               "micro": ("csize_embedder.mlp.0.weight", "adaln_single.emb.resolution_embedder.linear_1.weight")},
    "dit": {"patch": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
            "final": ("final_layer.linear.weight", "proj_out_2.weight"),
            "classes": ("y_embedder.embedding_table.weight", f"{_DIT_EMB}.class_embedder.embedding_table.weight")},
}
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S/B/L/XL
PIXART_HEADS = 16  # every PixArt-alpha/Sigma model (XL: 16 x 72)


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    layout: str | None = None,
    *,
    num_attention_heads: int | None = None,
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """A diffusers config for the model in ``state_dict``, read from tensor shapes.

    Args:
        state_dict: original or diffusers names (told apart by the keys themselves).
        layout: which model it is (:func:`detect_layout` when None).
        num_attention_heads: softmax heads, not readable from shapes. Default: 16 for PixArt,
            DiT's S/B/L/XL table (6/12/16/16) for DiT.
        sample_size: latent size (pixels / 8); default from ``pos_embed`` (1, N, C), found in an
            original state dict or in ``extras`` (:attr:`ConvertedCheckpoint.extras`).
        interpolation_scale: PixArt position-embedding scale; None lets diffusers choose.

    Returns:
        ``PixArtTransformer2DModel`` / ``DiTTransformer2DModel`` keyword arguments with
        ``_class_name``; a LiT checkpoint adds ``_litedge`` = {"family": "lit", "heads": C / d,
        "kernel_size": k} read from ``attn.dwc.weight`` (d, 1, k, k), which
        ``litedge.models.student.build_from_config`` turns into the student.
    """
    layout = layout or detect_layout(state_dict)
    original = not any(k.startswith("transformer_blocks.") for k in state_dict)
    teacher = _diffusers_teacher(set(state_dict)) if layout == "litedge-student" else layout.partition("-")[2]
    if teacher not in _PROBES:
        raise LitedgeError(f"cannot infer a config for layout {layout!r}: expected a PixArt or DiT checkpoint")
    names = {k: pair[0 if original else 1] for k, pair in _PROBES[teacher].items()}
    probe = {k: _need(state_dict, name, layout) for k, name in names.items() if k != "micro"}
    width, in_channels, patch, _ = probe["patch"].shape
    heads = num_attention_heads or _default_heads(teacher, width)
    if width % heads:
        raise LitedgeError(f"num_attention_heads={heads} does not divide the width {width}: pass a divisor of {width}")
    config = {
        "num_attention_heads": heads, "attention_head_dim": width // heads, "in_channels": in_channels,
        "out_channels": probe["final"].shape[0] // (patch * patch), "patch_size": patch,
        "num_layers": _count_blocks(state_dict, "blocks." if original else "transformer_blocks."),
        "sample_size": sample_size or _sample_size({**(extras or {}), **state_dict}, patch),
    }
    if teacher == "pixart":
        micro = names["micro"] in state_dict
        config.update(_class_name="PixArtTransformer2DModel", norm_type="ada_norm_single", cross_attention_dim=width,
                      caption_channels=probe["caption"].shape[1], use_additional_conditions=micro)
        if interpolation_scale is not None:
            config["interpolation_scale"] = interpolation_scale
    else:  # the class table has one extra row, the classifier-free "null" class
        config.update(_class_name="DiTTransformer2DModel", num_embeds_ada_norm=probe["classes"].shape[0] - 1,
                      norm_eps=1e-6)  # the original DiT's LayerNorm eps
    linear = _linear_of(state_dict, width)
    if linear:
        config["_litedge"] = linear
    return config


def _need(sd: Mapping[str, torch.Tensor], name: str, layout: str) -> torch.Tensor:
    if name not in sd:
        raise LitedgeError(f"{layout} checkpoint has no {name}: incomplete file or wrong layout")
    return sd[name]


def _default_heads(teacher: str, width: int) -> int:
    if teacher == "pixart" and width % PIXART_HEADS == 0:
        return PIXART_HEADS
    if teacher == "dit" and width in DIT_HEADS:
        return DIT_HEADS[width]
    if width % 64 == 0:
        return width // 64
    raise LitedgeError(f"cannot guess the head count of a width-{width} {teacher} model: pass num_attention_heads")


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))) or not found:
        raise LitedgeError(f"blocks {sorted(found)[:8]} are not numbered 0..N-1: incomplete checkpoint")
    return len(found)


def _sample_size(sd: Mapping[str, torch.Tensor], patch: int) -> int:
    pos = sd.get("pos_embed")
    if pos is None:
        raise LitedgeError("no pos_embed to read the latent size from: pass sample_size (e.g. 128 for 1024 px)")
    grid = math.isqrt(pos.shape[-2])
    if grid * grid != pos.shape[-2]:
        raise LitedgeError(f"pos_embed has {pos.shape[-2]} tokens, not a square grid: pass sample_size")
    return grid * patch


def _linear_of(sd: Mapping[str, torch.Tensor], width: int | None = None) -> dict | None:
    """A student's ``_litedge`` config from its weights: LiT's heads and kernel from the first
    depthwise conv (head_dim, 1, k, k); just the family for EDiT; None for a softmax model."""
    dwc = next((v for k, v in sd.items() if re.search(r"\.attn1?\.dwc\.weight$", k)), None)
    if width is None:
        patch = sd.get("pos_embed.proj.weight", sd.get("x_embedder.proj.weight"))
        width = patch.shape[0] if patch is not None else None
    if dwc is None or width is None:
        return {"family": detect_family(sd)} if detect_family(sd) != "softmax" else None
    return {"family": "lit", "heads": width // dwc.shape[0], "kernel_size": dwc.shape[-1]}
