"""Weights written into a traced ONNX graph one tensor at a time, quantized as they are written.

A graph traced with ``export_params=False`` and no constant folding names every parameter
as a graph input, reached through the few ops torch applies to it (a ``Transpose`` before
each ``MatMul``, ``Unsqueeze``, the ``Gather`` of a permutation). :func:`plan_weights` folds
those parameter-only chains symbolically (nothing is read yet), and :func:`write_weights`
then computes each resulting constant from the checkpoint, turns it into

- a ``MatMulNBits`` weight (``bits`` 4 or 8, blocks of ``block_size`` along K, fp32 scales)
  when a ``MatMul`` (or a ``Gemm``, rewritten as MatMul + Add) consumes it,
- a ``GatherBlockQuantized`` table (int4, blocks along the embedding width) when a
  ``Gather`` looks rows up in it and ``embeddings`` is set,
- plain fp32 otherwise,

appends it to the external data file and frees it: peak memory is one tensor.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from litedge.errors import LitedgeError
from litedge.quantize.int4 import layer_name

Thunk = Callable[[], np.ndarray]
_ALIGN = 4096  # page-aligned offsets: onnxruntime can memory-map the weights
_MIN_EXTERNAL_BYTES = 1024


@dataclass(frozen=True)
class WeightFormat:
    """How the linear layers' weights are stored.

    Attributes:
        bits: None for fp32, 4 or 8 for ``MatMulNBits`` (symmetric, fp32 scales).
        block_size: weights per scale along K (a power of two >= 16).
        embeddings: also store token-embedding tables (``Gather`` rows) block-quantized in int4.
        exclude: layer-name patterns kept fp32 (``litedge.quantize.int4`` naming).
    """

    bits: int | None = None
    block_size: int = 32
    embeddings: bool = False
    exclude: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "fp32" if self.bits is None else f"int{self.bits}-block{self.block_size}"


@dataclass
class WeightPlan:
    """What :func:`plan_weights` decided: constants to write and how each linear layer is stored."""

    constants: dict[str, Thunk]  # name -> value of every constant the kept nodes read
    origins: dict[str, tuple[str, str]]  # constant -> (weight input it comes from, "T" transposed | "" as is | "?")
    nodes: list[onnx.NodeProto]  # the graph's nodes after folding and quantizing
    quantized: dict[str, str] = field(default_factory=dict)  # constant -> "matmul" | "gather"
    layers: list[str] = field(default_factory=list)  # linear layers quantized
    left_fp32: dict[str, str] = field(default_factory=dict)  # linear layer -> why it stayed fp32
    embeddings: list[str] = field(default_factory=list)  # Gather tables quantized
    outputs: set[str] = field(default_factory=set)  # graph outputs that are constants


# ----------------------------------------------------------------------------- folding

def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold_op(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    """Evaluate one parameter-only node in numpy (the ops torch's exporter puts on weights)."""
    a = _attrs(node)
    op = node.op_type
    if op == "Transpose":
        return np.ascontiguousarray(np.transpose(args[0], a.get("perm")))
    if op == "Gather":
        return np.take(args[0], args[1], axis=int(a.get("axis", 0)))
    if op == "Unsqueeze":
        axes = [int(x) for x in (args[1] if len(args) > 1 else a["axes"])]
        out = args[0]
        for ax in sorted(x % (out.ndim + len(axes)) for x in axes):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        axes = args[1] if len(args) > 1 else a.get("axes")
        return np.squeeze(args[0], axis=None if axes is None else tuple(int(x) for x in axes))
    if op == "Reshape":
        shape = [int(s) for s in args[1]]
        shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return args[0].reshape(shape)
    if op == "Cast":
        return args[0].astype(helper.tensor_dtype_to_np_dtype(int(a["to"])))
    if op == "Identity":
        return args[0]
    if op in ("Mul", "Add", "Sub", "Div"):
        fn = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
        return fn(args[0], args[1]).astype(args[0].dtype, copy=False)
    if op == "Neg":
        return -args[0]
    raise AssertionError(op)


_FOLDABLE = {"Transpose", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity", "Mul", "Add", "Sub", "Div", "Neg"}


def plan_weights(graph: onnx.GraphProto, weights: dict[str, Thunk], fmt: WeightFormat) -> WeightPlan:
    """Fold the parameter-only chains of ``graph`` and choose each linear layer's storage.

    Args:
        graph: traced without parameters: each weight is a graph input named in ``weights``.
        weights: graph input name -> a function returning its fp32 (or integer) value.
        fmt: the weight format.
    """
    constants: dict[str, Thunk] = dict(weights)
    origins: dict[str, tuple[str, str]] = {n: (n, "") for n in weights}
    derived = set(weights)  # names computed from a weight
    literal: dict[str, np.ndarray] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            value = _attrs(node).get("value")
            if value is not None:
                literal[node.output[0]] = numpy_helper.to_array(value)
        inputs = [i for i in node.input if i]
        is_const = all(i in constants or i in literal for i in inputs)
        if node.op_type in _FOLDABLE and inputs and is_const and any(i in derived for i in inputs):
            thunk = _make_thunk(node, [constants.get(i) or _const(literal[i]) for i in node.input if i])
            out = node.output[0]
            constants[out], derived = thunk, derived | {out}
            src = next(origins[i] for i in inputs if i in origins)
            simple_t = node.op_type == "Transpose" and src[1] == "" and list(_attrs(node).get("perm", [1, 0])) == [1, 0]
            origins[out] = (src[0], "T" if simple_t else "?")
            continue
        kept.append(node)
    plan = WeightPlan(constants, origins, [], outputs={o.name for o in graph.output})
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    plan.constants = {k: v for k, v in constants.items() if k in used}
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input}
    plan.nodes = _quantize_nodes(kept, plan, fmt, shapes)
    return plan


def _const(value: np.ndarray) -> Thunk:
    return lambda: value


def _make_thunk(node: onnx.NodeProto, args: list[Thunk]) -> Thunk:
    return lambda: _fold_op(node, [a() for a in args])


def _excluded(node: onnx.NodeProto, fmt: WeightFormat) -> bool:
    layer = layer_name(node.name)
    for pattern in fmt.exclude:
        if pattern in (node.name, layer) or fnmatch.fnmatchcase(layer, pattern) or f".{pattern}." in f".{layer}.":
            return True
    return False


def _is_token_table(shape: tuple[int, ...] | None, fmt: WeightFormat) -> bool:
    """A vocabulary-sized (rows >= 1024) 2-D table whose rows split into blocks; position tables stay fp32."""
    return shape is not None and len(shape) == 2 and shape[0] >= 1024 and shape[1] % fmt.block_size == 0


def _quantize_nodes(nodes: list[onnx.NodeProto], plan: WeightPlan, fmt: WeightFormat,
                    graph_shapes: dict[str, tuple[int, ...]]) -> list[onnx.NodeProto]:
    """MatMul / Gemm -> MatMulNBits (+ Add), Gather -> GatherBlockQuantized, where ``fmt`` asks."""
    out: list[onnx.NodeProto] = []
    for node in nodes:
        weight = node.input[1] if len(node.input) > 1 else None
        if node.op_type in ("MatMul", "Gemm") and weight in plan.constants:
            layer = layer_name(node.name)
            replaced = _as_matmul_nbits(node, plan, fmt) if fmt.bits is not None and not _excluded(node, fmt) else None
            if replaced is None:
                if fmt.bits is not None:
                    plan.left_fp32[layer] = "excluded" if _excluded(node, fmt) else "not a 2-D constant weight"
                out.append(node)
            else:
                plan.layers.append(layer)
                out.extend(replaced)
            continue
        if node.op_type == "Gather" and fmt.embeddings and fmt.bits is not None and node.input[0] in plan.constants \
                and int(_attrs(node).get("axis", 0)) == 0 and _is_token_table(graph_shapes.get(node.input[0]), fmt):
            table = node.input[0]
            plan.quantized[table] = "gather"
            plan.embeddings.append(layer_name(node.name))
            out.append(helper.make_node(
                "GatherBlockQuantized", [table + "_Q4", node.input[1], table + "_scales"], list(node.output),
                name=node.name + "_Q4", domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=fmt.block_size,
            ))
            continue
        out.append(node)
    return out


def _as_matmul_nbits(node: onnx.NodeProto, plan: WeightPlan, fmt: WeightFormat) -> list[onnx.NodeProto] | None:
    a = _attrs(node)
    weight = node.input[1]
    if node.op_type == "Gemm":
        if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
            return None
        if a.get("transB", 0):  # weight (N, K): store its transpose (K, N) as MatMul reads it
            src = plan.constants[weight]
            transposed = weight + "_KxN"
            plan.constants[transposed] = lambda src=src: np.ascontiguousarray(src().T)
            origin = plan.origins[weight]
            plan.origins[transposed] = (origin[0], "T" if origin[1] == "" else "?")
            weight = transposed
    if weight in plan.quantized and plan.quantized[weight] != "matmul":
        return None
    plan.quantized[weight] = "matmul"
    matmul_out = node.output[0] + "_nbits" if node.op_type == "Gemm" and len(node.input) > 2 else node.output[0]
    nodes = [helper.make_node(
        "MatMulNBits", [node.input[0], weight + f"_Q{fmt.bits}", weight + "_scales"], [matmul_out],
        name=node.name + f"_Q{fmt.bits}", domain="com.microsoft", bits=fmt.bits, block_size=fmt.block_size,
        K=-1, N=-1,  # filled in by write_weights once the weight's shape is known
    )]
    if matmul_out != node.output[0]:
        nodes.append(helper.make_node("Add", [matmul_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    return nodes


# ----------------------------------------------------------------------------- quantization


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) fp32 matrix -> MatMulNBits' symmetric ``packed`` (N, K/block, block*bits/8) uint8 and ``scales`` (N, K/block).

    onnxruntime's own C++ kernels do the quantization (what ``MatMulNBitsQuantizer`` calls).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight, dtype=np.float32))
    return packed, scales


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, k: int, bits: int, block_size: int) -> np.ndarray:
    """The (K, N) fp32 matrix a ``MatMulNBits`` weight stands for (inverse of :func:`quantize_blocks`)."""
    n, k_blocks, _ = packed.shape
    if bits == 4:
        q = np.empty((n, k_blocks, packed.shape[2] * 2), dtype=np.int16)
        q[..., 0::2] = packed & 0x0F
        q[..., 1::2] = packed >> 4
        zero = 8
    else:
        q, zero = packed.astype(np.int16), 128
    w = (q[..., :block_size] - zero).astype(np.float32) * scales[:, :, None]  # (N, k_blocks, block)
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


TABLE_ROWS = 2048  # rows quantized at a time: onnxruntime's numpy quantizer makes several copies of its input


def quantize_table(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (V, D) embedding table -> GatherBlockQuantized's int4 data (V*D/2 bytes, row-major pairs) and scales (V, D/block).

    Blocks run along a row, so rows are quantized in chunks (same result, bounded memory).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    if table.shape[1] % 2:
        raise LitedgeError(f"embedding table of width {table.shape[1]}: int4 rows need an even width")
    data, scales = [], []
    for start in range(0, table.shape[0], TABLE_ROWS):
        chunk = np.ascontiguousarray(table[start:start + TABLE_ROWS], dtype=np.float32)
        q, s, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(chunk, 1, block_size, True)
        data.append(np.asarray(q).reshape(-1))
        scales.append(s)
    return np.concatenate(data), np.concatenate(scales, axis=0)


# ----------------------------------------------------------------------------- writing


class _DataFile:
    """Appends tensors to one external data file (or keeps them inline when ``path`` is None)."""

    def __init__(self, path: Path | None, location: str) -> None:
        self.path, self.location = path, location
        self.file = open(path, "xb") if path is not None else None
        self.written = 0

    def tensor(self, name: str, array: np.ndarray, onnx_type: int | None = None, dims: tuple[int, ...] | None = None) -> TensorProto:
        """``array`` as an initializer: appended to the data file (page-aligned) or, when small or inline, in the graph.

        The bytes go to the file directly: a TensorProto that once held them keeps them in its
        arena (upb protobuf) even after ``ClearField``, which would keep every weight resident.
        """
        array = np.ascontiguousarray(array)
        onnx_type = onnx_type if onnx_type is not None else helper.np_dtype_to_tensor_dtype(array.dtype)
        dims = list(dims if dims is not None else array.shape)
        self.written += array.nbytes
        if self.file is None or array.nbytes < _MIN_EXTERNAL_BYTES:
            return helper.make_tensor(name, onnx_type, dims, array.tobytes(), raw=True)
        self.file.write(b"\0" * (-self.file.tell() % _ALIGN))
        offset = self.file.tell()
        self.file.write(memoryview(array.reshape(-1).view(np.uint8)))
        t = TensorProto()
        t.name, t.data_type = name, onnx_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL  # what onnx's set_external_data writes, without needing raw_data first
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def write_weights(plan: WeightPlan, fmt: WeightFormat, data_path: Path | None, progress=None) -> tuple[list[TensorProto], dict]:
    """Compute, quantize and write every constant of ``plan``; fills the MatMulNBits K/N attributes.

    Args:
        data_path: the external data file to create (None: tensors stay inline).
        progress: called with the bytes of each tensor read (e.g. a tqdm ``update``).

    Returns:
        The initializers (external references or inline) and, for each quantized constant,
        ``{"K", "N"}`` (MatMul) or ``{"rows", "cols"}`` (Gather) for dequantized references.
    """
    data = _DataFile(data_path, data_path.name if data_path is not None else "")
    nbits: dict[str, list[onnx.NodeProto]] = {}
    for n in plan.nodes:
        if n.op_type == "MatMulNBits":
            nbits.setdefault(n.input[1], []).append(n)
    plain = {i for n in plan.nodes for i in n.input}
    inits: list[TensorProto] = []
    shapes: dict[str, dict] = {}
    try:
        for name, thunk in plan.constants.items():
            if name not in plain and name not in plan.quantized and name not in plan.outputs:
                continue  # only read through a quantized or transposed form
            value = thunk()
            if progress is not None:
                progress(value.nbytes)
            kind = plan.quantized.get(name)
            if kind == "matmul":
                if value.ndim != 2:
                    raise LitedgeError(f"weight {name} has shape {list(value.shape)}: MatMulNBits needs a 2-D weight")
                k, n = value.shape
                packed, scales = quantize_blocks(value.astype(np.float32), fmt.bits, fmt.block_size)
                inits.append(data.tensor(name + f"_Q{fmt.bits}", packed))
                inits.append(data.tensor(name + "_scales", scales))
                for node in nbits[name + f"_Q{fmt.bits}"]:
                    for attr in node.attribute:
                        if attr.name in ("K", "N"):
                            attr.i = k if attr.name == "K" else n
                shapes[name] = {"K": k, "N": n}
            elif kind == "gather":
                rows, cols = value.shape
                q, scales = quantize_table(value.astype(np.float32), fmt.block_size)
                inits.append(data.tensor(name + "_Q4", q, TensorProto.INT4, (rows, cols)))
                inits.append(data.tensor(name + "_scales", scales))
                shapes[name] = {"rows": rows, "cols": cols}
            if kind is None or name in plain:
                if value.dtype == np.float64:
                    value = value.astype(np.float32)
                inits.append(data.tensor(name, value))
            del value
    finally:
        data.close()
    return inits, shapes
