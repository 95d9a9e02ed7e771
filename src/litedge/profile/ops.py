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


_CONTROL_FLOW = ("Loop", "Scan", "If")  # their kernel time includes their subgraph's nodes


def _kernel_events(events: list[dict], counted: list[tuple[int, int]]) -> list[dict]:
    """Top-level kernel events inside the counted runs: a subgraph's nodes (a ``Loop`` body)
    are left out, their ``Loop`` counts them once."""
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
               and any(start <= e["ts"] <= end for start, end in counted)]
    loops = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in kernels if e.get("args", {}).get("op_name") in _CONTROL_FLOW]
    return [e for e in kernels
            if e.get("args", {}).get("op_name") in _CONTROL_FLOW or not any(a < e["ts"] < b for a, b in loops)]


def _group(event: dict, groups: tuple[tuple[str, re.Pattern], ...]) -> str:
    name = event["name"][: -len("_kernel_time")]
    if event.get("args", {}).get("op_name") in _CONTROL_FLOW and not name.startswith("/"):
        # The scripted chunked softmax attention (litedge.export.rewrites) is the only Loop litedge
        # exports; scripted code loses the module path, so its node is named "Loop_123".
        return "self-attention"
    return group_of(name, groups)


def _runs(events: list[dict], skip_runs: int) -> list[tuple[int, int]]:
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise ValueError(f"profile holds {len(runs)} runs; need more than the {skip_runs} skipped")
    return runs[skip_runs:]


def group_op_times(trace: str | Path, base: str, skip_runs: int = 1) -> dict[str, float]:
    """Mean seconds per run spent in each group, from an ORT profile JSON (``end_profiling()``).

    Kernel events only (``cat == "Node"``, names ending in ``_kernel_time``), so session
    overhead is not attributed; the first ``skip_runs`` runs (warm-up, memory planning)
    are left out. Returns ``{group: seconds}`` including ``other``.
    """
    return {g: s["seconds"] for g, s in op_stats(trace, base, skip_runs)["groups"].items()}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _shapes(entries: list[dict]) -> list[list[int]]:
    return [next(iter(e.values())) for e in entries if e]


def node_flops(event: dict) -> float:
    """Multiply-add FLOPs (2 per MAC) of one kernel event from its recorded shapes; 0 for
    anything but MatMul-like ops and convolutions.

    MatMul / Gemm / FusedMatMul / MatMulNBits: ``2 * numel(out) * K``, K the last dim of the
    first input; Conv: ``2 * numel(out) * numel(weight) / C_out``.
    """
    args = event.get("args", {})
    op = args.get("op_name", "")
    ins, outs = _shapes(args.get("input_type_shape", [])), _shapes(args.get("output_type_shape", []))
    if not ins or not outs or not ins[0]:
        return 0.0
    if op in ("MatMul", "FusedMatMul", "MatMulNBits", "MatMulInteger", "Gemm"):
        return 2.0 * _numel(outs[0]) * int(ins[0][-1])  # Gemm: torch's exporter never sets transA
    if op in ("Conv", "FusedConv", "NchwcConv") and len(ins) > 1 and len(ins[1]) >= 2:
        return 2.0 * _numel(outs[0]) * _numel(ins[1][1:])
    return 0.0


def op_stats(trace: str | Path, base: str, skip_runs: int = 1) -> dict:
    """Per run: each group's seconds, FLOPs and achieved GFLOP/s, and seconds by op type.

    Returns ``{"groups": {group: {"seconds", "gflop", "gflops"}}, "op_types": {op: seconds},
    "arena_mb": peak CPU arena held (MB, from the profiler's memory fields; 0 when absent),
    "run_seconds": the profiled runs' mean wall time (kernels plus what lies between them)}``.
    FLOPs count MatMul-like ops and convolutions only (:func:`node_flops`), so a group's rate
    says how close its matmul work runs to the machine's matmul rate, and its seconds say
    how much else it does.
    """
    events = json.loads(Path(trace).read_text())
    counted = _runs(events, skip_runs)
    groups = op_groups(base)
    per_group: dict[str, dict[str, float]] = {}
    per_type: dict[str, float] = {}
    arena = 0
    for event in _kernel_events(events, counted):
        seconds = event.get("dur", 0) / 1e6 / len(counted)
        stats = per_group.setdefault(_group(event, groups), {"seconds": 0.0, "gflop": 0.0})
        stats["seconds"] += seconds
        stats["gflop"] += node_flops(event) / 1e9 / len(counted)
        op = event.get("args", {}).get("op_name", "?")
        per_type[op] = per_type.get(op, 0.0) + seconds
        arena = max(arena, int(event.get("args", {}).get("mem_arena_held", 0) or 0))
    for stats in per_group.values():
        stats["gflops"] = stats["gflop"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    run_seconds = sum(end - start for start, end in counted) / 1e6 / len(counted)
    return {"groups": per_group, "op_types": dict(sorted(per_type.items(), key=lambda kv: -kv[1])),
            "arena_mb": arena / 2**20, "run_seconds": run_seconds}
