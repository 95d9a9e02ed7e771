"""onnxruntime-qnn's HTP backend, torch-free: SoC table, QDQ preparation, EPContext compile, simulator.

onnxruntime-qnn 2.x is a plug-in execution provider: it is registered once per process
with ``onnxruntime.register_execution_provider_library`` and added to a session through
its ``OrtEpDevice`` (``SessionOptions.add_provider_for_devices``), never through
``providers=[...]``. On Linux x86_64 its HTP backend compiles static-shape QDQ graphs for a
chosen SoC (``soc_model``/``htp_arch``) and runs the result on the x86 HTP simulator.

Every session here disables the CPU fallback (``session.disable_cpu_ep_fallback``) and
keeps graph input quantization / output dequantization inside QNN
(``offload_graph_io_quantization=0``), so a graph either runs entirely on HTP or fails
to load, naming the nodes that would not.
"""

from __future__ import annotations

import copy
import gc
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnx.version_converter
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from litedge.errors import LitedgeError
from litedge.export import onnx_io

EP_NAME = "QNNExecutionProvider"


@dataclass(frozen=True)
class Soc:
    """A Snapdragon SoC as QNN names it: ``soc_model`` (QnnSocModel id) and Hexagon ``htp_arch``."""

    name: str
    soc_model: int
    htp_arch: int
    marketing: str


# QNN's Qnn_SocModel_t ids and the Hexagon (HTP) architecture of each.
SOCS: dict[str, Soc] = {
    s.name: s
    for s in (
        Soc("sm8350", 30, 68, "Snapdragon 888"),
        Soc("sm8450", 36, 69, "Snapdragon 8 Gen 1"),
        Soc("sm8550", 43, 73, "Snapdragon 8 Gen 2"),
        Soc("sm8650", 57, 75, "Snapdragon 8 Gen 3"),
        Soc("sm8750", 69, 79, "Snapdragon 8 Elite"),
        Soc("sm8850", 87, 81, "Snapdragon 8 Elite Gen 5"),
        Soc("sc8380xp", 60, 73, "Snapdragon X Elite"),
    )
}
DEFAULT_SOC = "sm8650"


def get_soc(name: str | None) -> Soc:
    """The SoC of a ``--soc`` value (None: :data:`DEFAULT_SOC`); LitedgeError listing the known ones."""
    key = (name or DEFAULT_SOC).strip().lower()
    if key not in SOCS:
        known = ", ".join(f"{s.name} ({s.marketing})" for s in SOCS.values())
        raise LitedgeError(f"unknown --soc {name!r}: choose one of {known}")
    return SOCS[key]


def provider_options(soc: Soc) -> dict[str, str]:
    """QNN EP options: HTP backend for ``soc``, graph I/O (de)quantization on HTP too."""
    return {"backend_type": "htp", "soc_model": str(soc.soc_model), "htp_arch": str(soc.htp_arch),
            "offload_graph_io_quantization": "0"}


def qnn_devices() -> list:
    """The QNN EP's ``OrtEpDevice`` list, registering the plug-in library on first use."""
    try:
        import onnxruntime_qnn
    except ModuleNotFoundError:
        raise LitedgeError(
            "target snapdragon needs onnxruntime-qnn (a plug-in EP for onnxruntime): pip install 'litedge[qnn]'"
        ) from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise LitedgeError(f"onnxruntime-qnn {onnxruntime_qnn.__version__} registered no QNN device on this machine")
    return devices


def qnn_version() -> str:
    import onnxruntime_qnn

    return str(onnxruntime_qnn.__version__)


def _session_options(soc: Soc, config: dict[str, str], extra: dict[str, str] | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: every failure here is raised as one LitedgeError line instead
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    options.add_provider_for_devices(qnn_devices(), {**provider_options(soc), **(extra or {})})
    return options


# ----------------------------------------------------------------------------- graph preparation


def is_large(path: Path) -> bool:
    """Whether ``path`` keeps (or must keep) its weights in external data.

    True when it already does, or when its weights pass
    :data:`litedge.export.onnx_io.EXTERNAL_DATA_THRESHOLD` (read at call time; about 2 GB,
    protobuf's limit). Every step on such a graph loads it without its weights and writes
    them to a ``NAME.onnx.data`` file beside the graph.
    """
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    if any(uses_external_data(t) for t in tensors):
        return True
    return sum(len(t.raw_data) for t in tensors) > onnx_io.EXTERNAL_DATA_THRESHOLD


def remove_model(path: Path) -> None:
    """Delete a graph file and the external data files it names (missing files are ignored)."""
    path = Path(path)
    if not path.exists():
        return
    for file in onnx_io.model_files(path):
        file.unlink(missing_ok=True)


def fold_constants(src: Path, dst: Path) -> list[Path]:
    """Constant-fold with onnxruntime's basic (ONNX-standard) optimizer, metadata dropped.

    The legacy exporter leaves the sin-cos position embedding as an ``Einsum`` chain on
    constants, which QNN does not run; folded it is one initializer. The basic level also
    fuses ``MatMul + Add`` into ``Gemm``, which the QNN quantizer quantizes per channel.
    A large ``src`` (:func:`is_large`) is written with its weights in ``dst.onnx.data``:
    onnxruntime would otherwise serialize a protobuf past 2 GB that cannot be read back.
    Returns the files written (``dst`` first).
    """
    external = is_large(src)
    data = onnx_io.data_path_for(dst)
    data.unlink(missing_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    if external:  # a path relative to dst's folder; tensors under 1 KiB stay in the graph
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    session = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    del session
    gc.collect()
    model = onnx.load(str(dst), load_external_data=False)  # weights stay in dst.onnx.data
    del model.metadata_props[:]  # onnxruntime.quantization's QNN helpers choke on them
    used = {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, str(dst))
    return [dst, data] if external else [dst]


def to_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` converted to ONNX opset ``version`` by onnx's version converter (the weights untouched).

    onnxruntime.quantization converts a model below opset 21 itself when 16-bit or 4-bit
    types are asked for, but it serializes the whole model to do so, which fails past 2 GB;
    a model loaded with ``load_external_data=False`` is only its graph here.
    """
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    return onnx.version_converter.convert_version(model, version)


def decompose_layernorm(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Replace each last-axis ``LayerNormalization`` with ReduceMean/Sub/Mul/Sqrt/Div (in place).

    QNN HTP's LayerNorm gave wrong rows (rel err ~1) for PixArt's adaLN norms on the
    simulator while the same QDQ graph was right on CPU; the primitive form is right on HTP.
    A scale of ones and a bias of zeros (``elementwise_affine=False``) are dropped.
    Only the norms' scale and bias are read (from ``base_dir`` when they are external data:
    the folder of a model loaded with ``load_external_data=False``); other weights stay where
    they are. Returns the number of nodes replaced.
    """
    graph = model.graph
    consts = _Initializers(graph, base_dir)
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "LayerNormalization" or attrs.get("axis", -1) != -1:
            nodes.append(node)
            continue
        count += 1
        p, x = node.name or f"layernorm_{count}", node.input[0]
        eps = f"{p}/epsilon"
        graph.initializer.append(numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), eps))
        nodes += [
            helper.make_node("ReduceMean", [x], [f"{p}/mean"], name=f"{p}/ReduceMean", axes=[-1], keepdims=1),
            helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centered"], name=f"{p}/Sub"),
            helper.make_node("Mul", [f"{p}/centered", f"{p}/centered"], [f"{p}/squared"], name=f"{p}/Square"),
            helper.make_node("ReduceMean", [f"{p}/squared"], [f"{p}/var"], name=f"{p}/ReduceMean_1", axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{p}/var", eps], [f"{p}/var_eps"], name=f"{p}/AddEps"),
            helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"], name=f"{p}/Sqrt"),
        ]
        scale = consts.get(node.input[1])
        bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        steps = [("Div", f"{p}/std")]
        if scale is None or not np.all(scale == 1):
            steps.append(("Mul", node.input[1]))
        if bias is None or np.any(bias != 0):
            steps.append(("Add", node.input[2]))
        current = f"{p}/centered"
        for i, (op, other) in enumerate(steps):
            out = node.output[0] if i == len(steps) - 1 else f"{p}/{op.lower()}_{i}"
            nodes.append(helper.make_node(op, [current, other], [out], name=f"{p}/{op}_{i}"))
            current = out
    del graph.node[:]
    graph.node.extend(nodes)
    return count


class _Initializers:
    """Initializer name -> array, read on demand (external data from ``base_dir``)."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None) -> None:
        self._tensors = {i.name: i for i in graph.initializer}
        self._base_dir = str(base_dir) if base_dir is not None else ""

    def get(self, name: str) -> np.ndarray | None:
        tensor = self._tensors.get(name)
        if tensor is None:
            return None
        if uses_external_data(tensor) and not self._base_dir:
            raise ValueError(f"initializer {name!r} is external data: pass base_dir, the model's folder")
        return numpy_helper.to_array(tensor, self._base_dir)


# ----------------------------------------------------------------------------- compile and run


def cpu_nodes(path: Path, soc: Soc) -> Counter:
    """Op types (and names) of the nodes QNN would leave to the CPU EP, fallback allowed."""
    options = _session_options(soc, {"session.record_ep_graph_assignment_info": "1"})
    session = ort.InferenceSession(str(path), options)
    left = Counter()
    for subgraph in session.get_provider_graph_assignment_info():
        if subgraph.ep_name != EP_NAME:
            left.update(f"{n.op_type} ({n.name})" for n in subgraph.get_nodes())
    return left


def compile_context(qdq: Path, out: Path, soc: Soc, extra: dict[str, str] | None = None) -> list[Path]:
    """Compile a static-shape QDQ graph to an EPContext model ``out`` + its QNN context binary.

    ``extra``: QNN EP provider options added to :func:`provider_options` (e.g.
    ``{"enable_htp_prepare_only": "1"}``: write the context without loading it to run).
    Returns the files written (``out`` first). Raises LitedgeError naming the nodes HTP
    cannot run.
    """
    for stale in out.parent.glob(f"{out.stem}*"):
        stale.unlink()  # onnxruntime refuses to overwrite an EPContext model
    config = {"ep.context_enable": "1", "ep.context_file_path": str(out), "ep.context_embed_mode": "0",
              "session.disable_cpu_ep_fallback": "1"}
    try:
        ort.InferenceSession(str(qdq), _session_options(soc, config, extra))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        for stale in out.parent.glob(f"{out.stem}*"):
            stale.unlink()
        left = cpu_nodes(qdq, soc) if "CPU EP" in str(exc) else Counter()
        if left:
            names = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in left.most_common(8))
            raise LitedgeError(f"{out.name}: {sum(left.values())} nodes cannot run on QNN HTP ({soc.name}): {names}; "
                               "every node must run there: report the model") from None
        raise LitedgeError(f"{out.name}: QNN HTP compile for {soc.name} failed: {str(exc).splitlines()[0]}") from None
    finally:
        gc.collect()
    return [out, *context_binaries(out)]


def context_binaries(path: Path) -> list[Path]:
    """The QNN context binaries an EPContext model names (``ep_cache_context`` with embed_mode 0)."""
    model = onnx.load(str(path), load_external_data=False)
    found = []
    for node in model.graph.node:
        if node.op_type != "EPContext":
            continue
        embed_mode = next((a.i for a in node.attribute if a.name == "embed_mode"), 1)
        if embed_mode == 0:
            rel = _context_file(node)
            target = (path.parent / rel).resolve()
            if path.parent.resolve() not in target.parents or not target.is_file():
                raise LitedgeError(f"{path.name}: EPContext binary {rel!r} is missing or outside {path.parent}")
            if target not in found:
                found.append(target)
    return [path.parent / p.relative_to(path.parent.resolve()) for p in found]


def simulator_session(path: Path, soc: Soc) -> ort.InferenceSession:
    """A session on the HTP simulator (x86) for an EPContext or QDQ model, CPU fallback disabled.

    A context the simulator cannot load (e.g. ``QNN_COMMON_ERROR_MEM_ALLOC``: the compiled
    contexts together exceed what the HTP can allocate) raises :class:`LitedgeError` in one line.
    """
    try:
        return ort.InferenceSession(str(path), _session_options(soc, {"session.disable_cpu_ep_fallback": "1"}))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.RuntimeException) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^.*?\d+ : [A-Z_]+ : ", "", reason)  # onnxruntime's "[ONNXRuntimeError] : 10 : INVALID_GRAPH : "
        raise LitedgeError(f"{path.name}: the QNN HTP simulator ({soc.name}) cannot load the compiled model: "
                           f"{reason}") from None


def load_each_context(path: Path, soc: Soc) -> list[dict]:
    """Load each QNN context of a joined EPContext model (:func:`stitch_contexts`) on the HTP
    simulator, one at a time, each in a process of its own (so nothing a failed load of the
    whole model left behind in this process counts against it).

    For a model whose contexts do not fit the simulator together: this still proves that every
    context binary deserializes with every node on HTP. Each context gets a one-node EPContext
    graph beside the binaries (removed afterwards). Returns one ``{"context", "loaded_s"}`` per
    context; raises :class:`LitedgeError` naming the first that does not load.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    typed = {vi.name: vi for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    loaded = []
    for k, node in enumerate(model.graph.node):
        one = path.parent / f".{path.stem}.context{k:02d}.onnx"
        graph = helper.make_graph([node], f"context{k}", [typed[n] for n in node.input if n],
                                  [typed[n] for n in node.output if n])
        onnx.save(helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version), str(one))
        try:
            start = time.perf_counter()
            _in_child(["load", str(one), soc.name])
            loaded.append({"context": _context_file(node), "loaded_s": round(time.perf_counter() - start, 1)})
        finally:
            one.unlink(missing_ok=True)
    return loaded


def _context_file(node: onnx.NodeProto) -> str:
    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "ep_cache_context"), b"")
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- compile in parts

_BLOCK = re.compile(r"transformer_blocks[./](\d+)[./]")


@dataclass
class GraphPart:
    """One contiguous range of transformer blocks of a QDQ graph, as its own ONNX model.

    Attributes:
        path: the part's graph file; its initializers point into the whole graph's external
            data file (same folder), so writing a part copies no weights.
        blocks: (first, last) transformer block index it holds.
        inputs: names of the tensors it reads (graph inputs or earlier parts' outputs).
        outputs: names of the tensors it hands on (to later parts or the graph's outputs).
    """

    path: Path
    blocks: tuple[int, int]
    inputs: list[str]
    outputs: list[str]


def block_count(model: onnx.ModelProto) -> int:
    """How many ``transformer_blocks.N`` the node names of ``model`` hold (0: none)."""
    found = [int(m.group(1)) for n in model.graph.node if (m := _BLOCK.search(n.name))]
    return max(found) + 1 if found else 0


def split_graph(qdq: Path, blocks_per_part: int) -> list[GraphPart]:
    """Cut a QDQ transformer graph into parts of ``blocks_per_part`` transformer blocks each.

    Walking the graph backwards, a node named ``transformer_blocks.N`` goes to the part of block
    N, or earlier when one of its consumers is earlier (onnxruntime's common-subexpression
    elimination leaves one copy of what the blocks share, named after any of them); another
    node (embeddings, Q/DQ pairs, reshapes the optimizer added) goes to its first consumer's
    part, the output head to the last. So every part only reads the graph's inputs and earlier
    parts' outputs. Constant nodes and what is
    computed from initializers alone (weight DequantizeLinear, shape constants QNN needs
    static) are copied into each part that reads them. Each part is written beside ``qdq`` as
    ``{stem}.part{k}.onnx`` with the boundary tensors' types and static shapes from ONNX shape
    inference; chaining the parts computes the whole graph.

    Raises:
        LitedgeError: the graph has no transformer block names to cut at, or a boundary tensor
            has no static shape.
    """
    qdq = Path(qdq)
    model = onnx.load(str(qdq), load_external_data=False)
    blocks = block_count(model)
    if blocks == 0:
        raise LitedgeError(f"{qdq.name}: no transformer_blocks.N node names to split the graph at; compile it whole")
    per = max(int(blocks_per_part), 1)
    n_parts = -(-blocks // per)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constant: set[str] = set(initializers)  # tensors known without running the graph
    const_nodes: dict[str, onnx.NodeProto] = {}  # output name -> node, for nodes computed from constants
    for node in graph.node:
        if all(t in constant for t in node.input if t):
            constant.update(node.output)
            for t in node.output:
                const_nodes[t] = node
    # Backwards (consumers before producers): a node goes to the part of its block name, or earlier
    # when a consumer is in an earlier part (onnxruntime's common-subexpression elimination leaves
    # one copy of a computation the blocks share, named after any of them); an unnamed node goes
    # to its first consumer's part; the graph outputs' producers to the last part.
    graph_outputs = {o.name for o in graph.output}
    first_use: dict[str, int] = {}  # tensor -> earliest part reading it
    part_of: list[int | None] = [None] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if node.output and all(t in const_nodes for t in node.output):
            continue
        m = _BLOCK.search(node.name)
        uses = [first_use[t] for t in node.output if t in first_use]
        if any(t in graph_outputs for t in node.output):
            uses.append(n_parts - 1)
        named = [min(int(m.group(1)) // per, n_parts - 1)] if m else []
        part = min(named + uses) if named or uses else n_parts - 1  # a dead node: anywhere valid
        part_of[i] = part
        for t in node.input:
            if t and t not in constant:
                first_use[t] = min(first_use.get(t, part), part)
    typed = _value_types(model)
    made_by = {t: n for n in graph.node for t in n.output}
    consumers: dict[str, set[int]] = {}
    for node, part in zip(graph.node, part_of):
        for t in node.input:
            if t and part is not None:
                consumers.setdefault(t, set()).add(part)
    graph_outputs = {o.name for o in graph.output}
    parts = []
    for k in range(n_parts):
        nodes = [n for n, p in zip(graph.node, part_of) if p == k]
        if not nodes:
            continue
        # the constant subgraphs this part reads, in graph order
        need, stack = set(), [t for n in nodes for t in n.input if t in const_nodes]
        while stack:
            t = stack.pop()
            node = const_nodes[t]
            if id(node) not in need:
                need.add(id(node))
                stack.extend(i for i in node.input if i in const_nodes)
        nodes = [n for n, p in zip(graph.node, part_of) if p == k or (p is None and id(n) in need)]
        produced = {t for n in nodes for t in n.output}
        crossing = [t for t in dict.fromkeys(t for n in nodes for t in n.input if t)
                    if t not in produced and t not in initializers]
        nodes = _requantized(nodes, crossing, made_by)
        used = list(dict.fromkeys(t for n in nodes for t in n.input if t))
        inputs = [t for t in crossing]
        outputs = [t for n in nodes for t in n.output  # constants are recomputed where read
                   if t in graph_outputs or (t not in const_nodes and any(c > k for c in consumers.get(t, ())))]
        missing = [t for t in inputs + outputs if t not in typed]
        if missing:
            raise LitedgeError(f"{qdq.name}: no static type for {missing[0]!r} at a part boundary; compile the graph whole")
        sub = helper.make_graph(
            nodes, f"{graph.name or 'graph'}_part{k}", [typed[t] for t in inputs], [typed[t] for t in outputs],
            initializer=[initializers[t] for t in used if t in initializers],
        )
        part_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        path = qdq.parent / f"{qdq.stem}.part{k}.onnx"
        onnx.save(part_model, str(path))  # external initializers keep pointing into qdq's data file
        parts.append(GraphPart(path, (k * per, min((k + 1) * per, blocks) - 1), inputs, outputs))
    return parts


def _requantized(nodes: list, crossing: list[str], made_by: dict) -> list:
    """``nodes`` reading each crossing DequantizeLinear output through a copy of its Q/DQ pair.

    QNN groups ``DQ -> op -> Q`` into one quantized op; a part whose op read the float output
    of another part's DQ directly would leave that op unquantized. Q(DQ(x)) with the same
    scale and zero point is x, so the numbers are those of the whole graph.
    """
    rename, extra = {}, []
    for t in crossing:
        dq = made_by.get(t)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        params = list(dq.input[1:])
        q_out, dq_out = f"{t}/part_q", f"{t}/part_dq"
        extra.append(helper.make_node("QuantizeLinear", [t, *params], [q_out], name=f"{dq.name}/part_Q",
                                      **_int_attrs(dq)))
        extra.append(helper.make_node("DequantizeLinear", [q_out, *params], [dq_out], name=f"{dq.name}/part_DQ",
                                      **_int_attrs(dq)))
        rename[t] = dq_out
    if not rename:
        return nodes
    out = []
    for node in nodes:
        if any(i in rename for i in node.input):
            node = copy.deepcopy(node)
            for j, i in enumerate(node.input):
                node.input[j] = rename.get(i, i)
        out.append(node)
    return extra + out


def _int_attrs(node: onnx.NodeProto) -> dict:
    """The ``axis`` / ``block_size`` attributes of a Q/DQ node (per-axis parameters), if any."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in ("axis", "block_size")}


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Tensor name -> ValueInfo with its static type, from ONNX shape inference on the graph alone."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.elem_type and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = vi
    return out


def stitch_contexts(parts: list[Path], whole: onnx.ModelProto, out: Path) -> list[Path]:
    """One EPContext model ``out`` running the compiled parts in order: their EPContext nodes,
    with the whole graph's inputs and outputs, each still naming its own context binary.

    ``parts``: the compiled EPContext models (same folder as ``out``). Returns ``out`` and the
    context binaries it names.
    """
    nodes, opsets, types = [], {}, {}
    for path in parts:
        m = onnx.load(str(path), load_external_data=False)
        for vi in [*m.graph.input, *m.graph.output]:  # EPContext outputs have no inferable type
            types.setdefault(vi.name, vi)
        for node in m.graph.node:
            if node.op_type != "EPContext":
                raise LitedgeError(f"{path.name}: compiled part holds a {node.op_type} node outside QNN; "
                                   "every node must run on HTP")
            nodes.append(node)
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    ends = {vi.name for vi in [*whole.graph.input, *whole.graph.output]}
    graph = helper.make_graph(nodes, whole.graph.name or "graph", list(whole.graph.input), list(whole.graph.output),
                              value_info=[vi for name, vi in types.items() if name not in ends])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=whole.ir_version)
    onnx.save(model, str(out))
    for path in parts:
        path.unlink()
    return [out, *context_binaries(out)]


def compile_in_parts(qdq: Path, out: Path, soc: Soc, blocks_per_part: int,
                     extra: dict[str, str] | None = None) -> list[Path]:
    """Compile ``qdq`` as parts of ``blocks_per_part`` transformer blocks, each in its own process,
    into one EPContext model ``out`` with one EPContext node and QNN context binary per part.

    QNN's HTP graph preparation holds the whole graph's state at once (LiT-T2I-XL at 1024 px:
    past 19 GB); a part needs a fraction of it, and a child process per part returns its memory
    to the system before the next starts. The stitched model runs as the whole graph would
    (:func:`stitch_contexts`). Returns ``out`` first, then the context binaries.
    """
    qdq, out = Path(qdq), Path(out)
    for stale in out.parent.glob(f"{out.stem}.part*"):
        stale.unlink()
    parts = split_graph(qdq, blocks_per_part)
    compiled = []
    try:
        for k, part in enumerate(parts):
            target = out.parent / f"{out.stem}.part{k:02d}.onnx"
            _compile_in_child(part.path, target, soc, extra, f"blocks {part.blocks[0]}-{part.blocks[1]}")
            compiled.append(target)
            part.path.unlink()
        whole = onnx.load(str(qdq), load_external_data=False)
        return stitch_contexts(compiled, whole, out)
    except BaseException:
        for stale in [*out.parent.glob(f"{out.stem}.part*"), out, *(p.path for p in parts)]:
            Path(stale).unlink(missing_ok=True)
        raise


def _compile_in_child(qdq: Path, out: Path, soc: Soc, extra: dict[str, str] | None, what: str) -> None:
    import json

    try:
        _in_child(["compile", str(qdq), str(out), soc.name, json.dumps(extra or {})])
    except LitedgeError as exc:
        raise LitedgeError(f"{out.name} ({what}): QNN HTP compile for {soc.name} failed: {exc}") from None


def _in_child(args: list[str]) -> None:
    """Run ``python -m litedge.export.qnn_ep ARGS`` (:func:`_main`); LitedgeError with its last error line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "litedge.export.qnn_ep", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        raise LitedgeError(reason)


def _main(argv: list[str]) -> int:
    """For a child process: ``python -m litedge.export.qnn_ep compile QDQ OUT SOC [EXTRA_JSON]`` (one
    compile) or ``... load MODEL SOC`` (load on the HTP simulator, not run)."""
    import json
    import sys

    if not ((argv[:1] == ["compile"] and len(argv) >= 4) or (argv[:1] == ["load"] and len(argv) == 3)):
        print("usage: python -m litedge.export.qnn_ep compile QDQ OUT SOC [EXTRA_JSON] | load MODEL SOC", file=sys.stderr)
        return 2
    try:
        if argv[0] == "load":
            simulator_session(Path(argv[1]), get_soc(argv[2]))
        else:
            compile_context(Path(argv[1]), Path(argv[2]), get_soc(argv[3]), json.loads(argv[4]) if len(argv) > 4 else None)
    except LitedgeError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
