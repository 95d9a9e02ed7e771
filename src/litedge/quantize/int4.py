"""Block-wise 4-bit weights for exported ONNX graphs (MatMulNBits), torch-free.

onnxruntime's ``MatMulNBitsQuantizer`` turns every ``MatMul`` with a constant weight into a
``com.microsoft.MatMulNBits`` node (int4 blocks of ``block_size`` along K, one fp32 scale per
block, and a zero point when asymmetric). It ignores ``Gemm``, which is how the exporter
writes a 2-D ``nn.Linear`` (the timestep and adaLN MLPs), so :func:`gemm_to_matmul` first
rewrites those as ``MatMul`` + ``Add``: then every linear layer is quantized unless the
caller excludes it by name.

Layer names are the exporter's node names without the op: node
``/model/transformer_blocks.0/attn1/to_q/MatMul`` is layer
``model.transformer_blocks.0.attn1.to_q``. An ``exclude`` entry matches a layer when it is a
run of whole dotted components of the name (``"to_q"``, ``"transformer_blocks.0"``,
``"proj_out"``), a glob (``"*.ff.*"``), or the exact node name.

Example::

    report = quantize_int4("transformer.onnx", "transformer.int4.onnx", exclude=["proj_out"])
    report.summary()
    # '25/26 linear layers int4 (block 32, symmetric); 1 fp32: proj_out; 2.4 GB -> 0.4 GB (0.16x)'
"""

from __future__ import annotations

import fnmatch
import gc
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from litedge.errors import LitedgeError
from litedge.export.onnx_io import compare, cpu_session, file_bytes, save_onnx

LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class QuantReport:
    """What :func:`quantize_int4` did. Sizes in bytes, graph file plus external data."""

    path: Path
    block_size: int
    symmetric: bool
    quantized: list[str] = field(default_factory=list)  # layer names now MatMulNBits
    left_fp32: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed fp32
    gemm_rewritten: int = 0  # Gemm nodes turned into MatMul + Add first
    size_before: int = 0
    size_after: int = 0
    fidelity: dict | None = None  # max_abs_err / rel_err vs the fp32 graph, when inputs were given

    @property
    def linear_total(self) -> int:
        return len(self.quantized) + len(self.left_fp32)

    @property
    def size_ratio(self) -> float:
        return self.size_after / self.size_before if self.size_before else float("nan")

    def summary(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        left = f"; {len(self.left_fp32)} fp32: {', '.join(self.left_fp32)}" if self.left_fp32 else ""
        err = f"; rel_err {self.fidelity['rel_err']:.3g} vs fp32" if self.fidelity else ""
        return (
            f"{len(self.quantized)}/{self.linear_total} linear layers int4 (block {self.block_size}, {kind}){left}; "
            f"{_human(self.size_before)} -> {_human(self.size_after)} ({self.size_ratio:.2f}x){err}"
        )


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- graph helpers


def layer_name(node_name: str) -> str:
    """The module path of an exported node: ``/model/blocks.0/attn/to_q/MatMul`` -> ``model.blocks.0.attn.to_q``.

    The exporter's scopes repeat the parent inside a called container
    (``/cond/cond.0/Gemm`` for ``nn.Sequential`` ``cond``): such a segment replaces its parent.
    """
    segments = [p for p in node_name.strip("/").split("/") if p]
    if len(segments) > 1:
        segments = segments[:-1]  # the op leaf the exporter appends: MatMul, Gemm, MatMul_1...
    parts: list[str] = []
    for seg in segments:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


def _matches(pattern: str, node_name: str) -> bool:
    layer = layer_name(node_name)
    if pattern == node_name or pattern == layer:
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(layer, pattern)
    return f".{pattern}." in f".{layer}."


def linear_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``MatMul``/``Gemm`` nodes whose second input (the weight) is a float initializer of rank >= 2."""
    inits = {t.name: t for t in graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return [
        n
        for n in graph.node
        if n.op_type in LINEAR_OPS
        and len(n.input) > 1
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) >= 2
        and inits[n.input[1]].data_type in floats
    ]


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each ``Gemm`` with a constant weight as ``MatMul`` (+ ``Add`` for the bias), in place.

    ``Y = alpha * A @ op(B) + beta * C`` becomes ``MatMul(A, alpha * op(B)) + beta * C`` with
    the weight stored (K, N) as MatMul expects. Exact up to fp32 rounding of the scaled
    weight (alpha = beta = 1 from nn.Linear: bit-exact weights). Gemms with ``transA`` or a
    non-constant scaled bias are left alone. Returns how many were rewritten.
    """
    graph = model.graph
    _name_unnamed(graph)
    inits = {t.name: t for t in graph.initializer}
    taken = {n.name for n in graph.node} | set(inits) | {v for n in graph.node for v in n.output}
    linear = {n.name for n in linear_nodes(graph)}
    new_nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        replacement = _gemm_as_matmul(node, graph, inits, taken) if node.name in linear else None
        new_nodes.extend(replacement or [node])
        rewritten += replacement is not None
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return rewritten


def _gemm_as_matmul(node: onnx.NodeProto, graph: onnx.GraphProto, inits: dict, taken: set[str]) -> list[onnx.NodeProto] | None:
    """``[MatMul, Add]`` (new weights appended to ``graph``) for one Gemm; None if it cannot be."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if node.op_type != "Gemm" or attrs.get("transA", 0) or (bias is not None and beta != 1.0 and bias not in inits):
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])  # (N, K) if transB else (K, N)
    if attrs.get("transB", 0):
        weight = weight.T  # (K, N)
    if alpha != 1.0:
        weight = weight * np.asarray(alpha, dtype=weight.dtype)
    w_name = _unique(node.input[1] + "_KxN", taken)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
    base = node.name[: -len("/Gemm")] if node.name.endswith("/Gemm") else node.name
    mm_out = _unique(node.output[0] + "_matmul", taken) if bias is not None else node.output[0]
    nodes = [helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=_unique(base + "/MatMul", taken))]
    if bias is not None:
        if beta != 1.0:
            c = numpy_helper.to_array(inits[bias])
            bias = _unique(bias + "_scaled", taken)
            graph.initializer.append(numpy_helper.from_array((c * np.asarray(beta, dtype=c.dtype)).astype(c.dtype), bias))
        nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=_unique(base + "/Add", taken)))
    return nodes


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Names read by the graph's nodes (subgraphs included: they may read outer initializers) or outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _used_names(sub)
    return used


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(keep)


def _name_unnamed(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: the quantizer excludes and reports nodes by name."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = _unique(f"{node.op_type}_{i}", taken)


def _why_left(node: onnx.NodeProto, excluded: set[str]) -> str:
    if node.name in excluded:
        return "excluded"
    if node.op_type == "Gemm":
        return "Gemm not rewritable as MatMul (transA, or a scaled non-constant bias)"
    return "weight onnxruntime does not quantize (batched N-D weight)"


def _resolve_exclude(patterns: Iterable[str], nodes: Sequence[onnx.NodeProto]) -> set[str]:
    excluded: set[str] = set()
    for pattern in patterns:
        hits = {n.name for n in nodes if _matches(pattern, n.name)}
        if not hits:
            examples = ", ".join(layer_name(n.name) for n in nodes[:4])
            raise LitedgeError(
                f"exclude entry {pattern!r} matches no linear layer; layer names look like {examples}: "
                "use a dotted part of one (e.g. 'proj_out') or a glob"
            )
        excluded |= hits
    return excluded


# ----------------------------------------------------------------------------- public API


def quantize_int4(
    onnx_in: str | Path,
    onnx_out: str | Path,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    exclude: Sequence[str] = (),
    check_inputs: Mapping[str, np.ndarray] | None = None,
) -> QuantReport:
    """Quantize every linear layer of an ONNX graph to block-wise int4 (``MatMulNBits``).

    Args:
        onnx_in: fp32 (or fp16) ONNX file; external data beside it is read too.
        onnx_out: where to write the quantized graph (``.onnx.data`` beside it past 2 GB).
        block_size: weights per scale along K (a power of two, >= 16).
        symmetric: int4 in [-8, 7] with no zero point; False adds a 4-bit zero point per block.
        exclude: layers to keep fp32, by name (see the module docstring); an entry that
            matches nothing is an error, so a typo never silently quantizes a layer.
        check_inputs: graph inputs (name -> array); when given, both graphs run on them in
            onnxruntime and ``report.fidelity`` holds the int4 output's error vs fp32.

    Returns:
        A :class:`QuantReport`: layers quantized and left fp32 (with why), sizes.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise LitedgeError(f"block_size {block_size} is not supported: expected a power of two >= 16, e.g. 32")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if not onnx_in.is_file():
        raise LitedgeError(f"{onnx_in} does not exist: export the model first")
    if onnx_out.resolve() == onnx_in.resolve():
        raise LitedgeError(f"onnx_out is the input {onnx_in}: write the int4 graph to another file")
    size_before = file_bytes(onnx_in)
    model = onnx.load(str(onnx_in))
    gemms = gemm_to_matmul(model)  # also names unnamed nodes: exclusion and the report go by name
    linears = linear_nodes(model.graph)
    excluded = _resolve_exclude(exclude, linears)

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=symmetric, nodes_to_exclude=sorted(excluded),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.topological_sort()
    out_model = quantizer.model.model
    save_onnx(out_model, onnx_out)

    done = {n.name for n in out_model.graph.node if n.op_type == "MatMulNBits"}
    report = QuantReport(onnx_out, block_size, symmetric, gemm_rewritten=gemms)
    for node in linears:
        name = layer_name(node.name)
        if f"{node.name}_Q4" in done:
            report.quantized.append(name)
        else:
            report.left_fp32[name] = _why_left(node, excluded)
    del model, out_model, quantizer
    gc.collect()
    report.size_before, report.size_after = size_before, file_bytes(onnx_out)
    report.fidelity = _compare(onnx_in, onnx_out, check_inputs)
    return report


def _compare(fp32_path: Path, int4_path: Path, inputs: Mapping[str, np.ndarray] | None) -> dict | None:
    """Load the int4 graph (always: it must be valid) and, given inputs, compare with fp32."""
    int4 = cpu_session(int4_path)
    if inputs is None:
        return None
    got = int4.run(None, dict(inputs))[0]
    del int4
    ref = cpu_session(fp32_path).run(None, dict(inputs))[0]
    return {**compare(got, ref), "vs": "onnx-fp32"}
