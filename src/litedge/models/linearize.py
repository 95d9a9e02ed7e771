"""linearize(): turn a diffusers softmax DiT into a LiT / EDiT / MM-EDiT student.

Weight inheritance (LiT guidelines 3 and 4): the student is a copy of the teacher in which
every softmax self-attention is replaced by a linear one; every other weight is kept
bit-identical, the new attention projections start from a fresh random initialization.
The student stays an instance of the teacher's diffusers class, so its forward signature,
its pipelines and its export wrappers are the teacher's. On disk it is saved under a litedge
class name (:data:`STUDENT_CLASS_NAMES`, see ``litedge.models.student_classes``) so that
diffusers' own ``from_pretrained`` builds the linear attention instead of softmax.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from litedge.errors import LitedgeError
from litedge.models.edit_attention import EDiTAttention, EtaMode, MMEDiTJointAttention
from litedge.models.linear_attention import GridAware, LiTAttention

Family = Literal["lit", "edit", "mmedit"]
FAMILIES: tuple[str, ...] = ("lit", "edit", "mmedit")
TEACHER_KINDS = {
    "PixArtTransformer2DModel": "pixart",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
}
# The diffusers-loadable subclass a saved student names (litedge.models.student_classes).
STUDENT_CLASS_NAMES = {
    "PixArtTransformer2DModel": "LitedgePixArtTransformer2DModel",
    "DiTTransformer2DModel": "LitedgeDiTTransformer2DModel",
    "SD3Transformer2DModel": "LitedgeSD3Transformer2DModel",
}
# LiT's head counts by DiT width (S, B, L, XL); text-to-image LiT uses 2.
LIT_DIT_HEADS = {384: 2, 768: 3, 1024: 4, 1152: 4}


@dataclass(frozen=True)
class LinearizeConfig:
    """How a student's self-attention was replaced; saved as ``_litedge`` in its config.json."""

    family: Family
    heads: int | None = None  # LiT / EDiT heads (MM-EDiT keeps the teacher's, the prompt side needs them)
    kernel_size: int = 5  # LiT's depthwise conv over V
    reduction: int = 4  # EDiT ConvFusion channel compression
    eta: EtaMode = "token-ratio"  # MM-EDiT image-row mixing weight

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LinearizeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LitedgeError(f"unknown student config keys {unknown}: written by a newer litedge? upgrade litedge")
        return cls(**data)


@dataclass
class LinearizeReport:
    """Parameter names of the student, by origin."""

    inherited: list[str] = field(default_factory=list)  # copied unchanged from the teacher
    new: list[str] = field(default_factory=list)  # randomly initialized linear-attention weights
    dropped: list[str] = field(default_factory=list)  # teacher weights the student no longer has

    def summary(self) -> str:
        return f"{len(self.inherited)} inherited, {len(self.new)} new, {len(self.dropped)} dropped parameter tensors"


def diffusers_class_name(model: nn.Module) -> str | None:
    """The diffusers transformer class ``model`` is (or subclasses, e.g. a litedge student class); None if none."""
    for cls in type(model).__mro__:
        if cls.__name__ in TEACHER_KINDS and cls.__module__.startswith("diffusers."):
            return cls.__name__
    return None


def teacher_kind(model: nn.Module) -> str:
    """'pixart', 'dit' or 'sd3' from the diffusers class; LitedgeError for anything else."""
    name = diffusers_class_name(model)
    if name is None:
        raise LitedgeError(
            f"cannot linearize a {type(model).__name__}: expected one of {sorted(TEACHER_KINDS)} (a diffusers transformer)"
        )
    return TEACHER_KINDS[name]


def default_heads(model: nn.Module, family: Family) -> int:
    """LiT: the paper's few heads (2 for text-to-image, S/B/L/XL table for DiT); EDiT: the teacher's."""
    width = model.config.num_attention_heads * model.config.attention_head_dim
    if family == "edit":
        return model.config.num_attention_heads
    if teacher_kind(model) == "dit":
        return LIT_DIT_HEADS.get(width, 2)
    return 2


def _self_attention_slots(model: nn.Module, family: Family) -> list[tuple[nn.Module, str]]:
    """(block, attribute) pairs of every softmax self-attention the family replaces."""
    kind = teacher_kind(model)
    if kind == "sd3" and family != "mmedit":
        raise LitedgeError(f"family {family!r} cannot linearize SD3's joint attention: use --family mmedit")
    if kind != "sd3" and family == "mmedit":
        raise LitedgeError(f"family 'mmedit' needs an SD3 (MM-DiT) teacher, got a {type(model).__name__}: use lit or edit")
    slots = []
    for block in model.transformer_blocks:
        for attr in ("attn", "attn2") if kind == "sd3" else ("attn1",):
            if getattr(block, attr, None) is not None:
                slots.append((block, attr))
    return slots


def _make_linear_attention(teacher_attn: nn.Module, attr: str, cfg: LinearizeConfig, heads: int) -> nn.Module:
    dim = teacher_attn.to_q.in_features
    if cfg.family == "lit":
        return LiTAttention(dim, heads, kernel_size=cfg.kernel_size)
    if cfg.family == "edit" or attr == "attn2":  # SD3.5's image-only second attention
        return EDiTAttention(dim, heads, reduction=cfg.reduction)
    return MMEDiTJointAttention(teacher_attn, reduction=cfg.reduction, eta=cfg.eta)


def attach_grid_hook(model: nn.Module) -> None:
    """Before each forward, tell every linear attention the latent grid of this call's input.

    The transformer's input is ``hidden_states`` (B, C, H, W); its tokens form an
    (H / patch, W / patch) grid. Traced exports keep these sizes symbolic.
    """
    if getattr(model, "_litedge_grid_hook", None) is not None:
        return

    def set_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Looks the mixers up on each call (not in a closure) so deep copies (EMA) stay correct.
        x = args[0] if args else kwargs["hidden_states"]
        patch = module.config.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        for m in module.modules():
            if isinstance(m, GridAware):
                m.grid = grid

    model._litedge_grid_hook = model.register_forward_pre_hook(set_grid, with_kwargs=True)


def linearize_(model: nn.Module, cfg: LinearizeConfig) -> nn.Module:
    """Replace the self-attention of ``model`` in place (new weights random); returns ``model``."""
    if cfg.family not in FAMILIES:
        raise LitedgeError(f"unknown family {cfg.family!r}: expected one of {', '.join(FAMILIES)}")
    slots = _self_attention_slots(model, cfg.family)
    heads = cfg.heads if cfg.heads is not None else default_heads(model, cfg.family)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    if heads <= 0 or width % heads:
        raise LitedgeError(f"heads={heads} does not divide the model width {width}: choose a divisor of {width}")
    for block, attr in slots:
        setattr(block, attr, _make_linear_attention(getattr(block, attr), attr, cfg, heads))
    model._litedge_config = dataclasses.replace(cfg, heads=heads)
    attach_grid_hook(model)
    return model


def linearize(
    teacher: nn.Module,
    family: Family,
    heads: int | None = None,
    *,
    kernel_size: int = 5,
    reduction: int = 4,
    eta: EtaMode = "token-ratio",
    seed: int | None = None,
) -> tuple[nn.Module, LinearizeReport]:
    """Make a linear-attention student of a diffusers softmax transformer.

    Args:
        teacher: a ``PixArtTransformer2DModel``, ``DiTTransformer2DModel`` (families lit,
            edit) or ``SD3Transformer2DModel`` (family mmedit). Left unchanged.
        family: "lit", "edit" or "mmedit".
        heads: heads of the new linear attention (default: LiT's few heads, EDiT: the
            teacher's). MM-EDiT keeps the teacher's heads.
        kernel_size: LiT's depthwise conv size. reduction: EDiT ConvFusion compression.
        eta: MM-EDiT's image-row mixing weight, "token-ratio" or "exact".
        seed: seed for the new weights' initialization (None: the global RNG).

    Returns:
        (student, report): the student is a new module of the teacher's class; the report
        lists inherited, new and dropped parameter names.
    """
    cfg = LinearizeConfig(family=family, heads=heads, kernel_size=kernel_size, reduction=reduction, eta=eta)
    student = copy.deepcopy(teacher)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        linearize_(student, cfg)
    teacher_keys = set(teacher.state_dict())
    student_keys = list(student.state_dict())
    report = LinearizeReport(
        inherited=[k for k in student_keys if k in teacher_keys],
        new=[k for k in student_keys if k not in teacher_keys],
        dropped=sorted(teacher_keys - set(student_keys)),
    )
    return student, report


def linearize_config_of(model: nn.Module) -> LinearizeConfig | None:
    """The LinearizeConfig a student was made with; None for a softmax teacher."""
    return getattr(model, "_litedge_config", None)
