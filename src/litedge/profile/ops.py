"""Group ONNX Runtime profiler events by what the model does (torch-free).

The exporter keeps module paths in node names (``/model/transformer_blocks.3/attn1/q/MatMul``),
so each kernel's time is attributed by the first group whose pattern its node name
matches. The groups follow the LiT paper's breakdown of a DiT block (self-attention 42.6%
on an A100): self-attention, cross-attention, MLP, modulation/norm (adaLN, norms, gates
and residual adds inside a block), the embeddings and output layers around the blocks,
and the layout nodes onnxruntime inserts itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OTHER = "other"
_BLOCK = r"transformer_blocks\.\d+/"


def op_groups(base: str) -> tuple[tuple[str, re.Pattern], ...]:
    """(group, pattern) pairs in matching order for a model base ("pixart-sigma", "dit", "sd3.5").

    PixArt / DiT blocks call their self-attention ``attn1`` and PixArt's cross-attention
    ``attn2``; SD3 blocks call the joint attention ``attn`` and SD3.5's second, image-only
    self-attention ``attn2``.
    """
    self_attn = rf"{_BLOCK}(attn|attn2)/" if base.startswith("sd3") else rf"{_BLOCK}attn1/"
    groups = [("self-attention", self_attn)]
    if not base.startswith("sd3"):
        groups.append(("cross-attention", rf"{_BLOCK}attn2/"))
    groups += [
        ("mlp", rf"{_BLOCK}ff(_context)?/"),
        ("modulation/norm", rf"{_BLOCK}"),  # adaLN, norms, gates and residual adds of a block
        # Outside the blocks: patch/position/caption/timestep embeddings, the final layer.
        ("embedding/output", r"^/model/"),
        # Nodes onnxruntime's optimizer inserts (layout reorders, folded helpers) carry no module path.
        ("runtime layout", r"^(?!/)"),
    ]
    return tuple((name, re.compile(pattern)) for name, pattern in groups)


def group_of(node_name: str, groups: tuple[tuple[str, re.Pattern], ...]) -> str:
    """The group of one node (``other`` when no pattern matches)."""
    for group, pattern in groups:
        if pattern.search(node_name):
            return group
    return OTHER


def group_op_times(trace: str | Path, base: str, skip_runs: int = 1) -> dict[str, float]:
    """Mean seconds per run spent in each group, from an ORT profile JSON (``end_profiling()``).

    Kernel events only (``cat == "Node"``, names ending in ``_kernel_time``), so session
    overhead is not attributed; the first ``skip_runs`` runs (warm-up, memory planning)
    are left out. Returns ``{group: seconds}`` including ``other``.
    """
    events = json.loads(Path(trace).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise ValueError(f"profile holds {len(runs)} runs; need more than the {skip_runs} skipped")
    counted = runs[skip_runs:]
    groups = op_groups(base)
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(start <= event["ts"] <= end for start, end in counted):
            continue
        group = group_of(event["name"][: -len("_kernel_time")], groups)
        totals[group] = totals.get(group, 0.0) + event.get("dur", 0) / 1e6 / len(counted)
    return totals
