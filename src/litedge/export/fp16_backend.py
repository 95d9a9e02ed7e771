"""The cuda and directml targets: fp16 ONNX graphs with fp32 islands, int4 or fp16 weights.

Each component is exported fp32 first (:mod:`litedge.export.onnx_export`), fused in fp32
with onnxruntime's transformer optimizer (:func:`fuse_fp32`, the order of onnxruntime's own
Stable Diffusion demo: fusing after the fp16 conversion finds nothing, the casts break the
patterns), then converted with onnxruntime's ``float16`` converter. Graph inputs and outputs stay float32 (the runtime
feeds what it feeds the cpu target; the graph casts at its edges), and three kinds of nodes
stay fp32 (:func:`fp32_islands`):

- ``upcast``: every region the PyTorch code computes in fp32 on purpose, found as the nodes
  between the ``Cast(to=float)`` that ``.float()`` emits and the ``Cast`` back of
  ``.to(dtype)`` in the same scope. In LiT and EDiT that is :func:`linear_attention`: the
  key mean, the normalizer and its reciprocal, the ``K^T V`` product and ``Q (K^T V)``.
- ``sinusoid``: everything ``Sin``/``Cos`` read (timestep and position features): fp16
  cannot hold ``t * freq`` for t near 1000 to better than 0.5 rad.
- ``shape_derived``: nodes whose values depend on no graph input's values (position tables,
  T5's relative-position buckets, ``m ** -0.5`` scales): no activations, so fp32 is free.
- ops in :data:`FP32_OPS`, by type. Norms stay fp16 (CUDA's kernels accumulate in fp32;
  keeping them fp32 changed the tiny models' error by < 10%).

The cuda graph keeps dynamic shapes. The directml graph is static: one transformer and one
VAE graph per ``--sizes`` bucket (batch 2 for the transformer, cond + uncond; batch 1 for
the VAE), a fixed prompt length (:data:`STATIC_TEXT_LENGTH`), recorded in each component's
``meta``. The manifest's ``transformer`` names the first bucket as ``file``, the others as
``extra_files``, and ``meta["buckets"] = {"512x512": "transformer_512x512.onnx", ...}``.

Fidelity: every fp16 (and int4) graph runs on onnxruntime's CPU EP against PyTorch fp32 on
the inputs of the fp32 export's parity check, twice: as is (``cpu_ep``: the CPU EP computes
most fp16 ops in fp32 and drops the rounding between them, a lower bound), and as
:func:`fp16_emulation` (``rel_err``: fp16 rounding after every op, fp32 math, close to a
GPU). No CUDA or DirectML EP is needed to export. A transformer past :data:`FP16_RTOL` fails the export (a broken conversion, not
rounding); a VAE decoder or text encoder past it, or with inf/NaN output (SDXL's VAE and
T5-v1.1-XXL are known to overflow fp16), is kept fp32 and ``meta["precision"]`` says so.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from onnx import TensorProto
from torch import nn

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.backend import Backend, BackendOptions, ExportReport, stage
from litedge.export.bundle_export import BASE_DEFAULTS
from litedge.export.onnx_export import (
    ExportResult,
    _parity,
    export_text_encoder,
    export_transformer,
    export_vae_decoder,
)
from litedge.export.onnx_io import model_files, save_onnx
from litedge.export.specs import SampleSize, VaeDecoderWrapper, text_encoder_wrapper, transformer_wrapper
from litedge.export.targets import TargetProfile

FP32_OPS = frozenset({"Sin", "Cos", "Exp", "Pow", "Range"})  # besides the converter's own block list
FP16_RTOL = 0.1  # fp16 vs PyTorch fp32 (max abs err / max abs ref) past which fp16 is broken, not rounded
VAE_SCALE_FACTOR = 8  # image px per latent px; export_bundle checks --sizes against it
STATIC_BATCH = {"transformer": 2, "vae_decoder": 1, "text_encoder": 2}  # cond + uncond; one image decoded
# Prompt tokens of static graphs: the base pipeline's (SD3's joint sequence is CLIP 77 + T5 256).
STATIC_TEXT_LENGTH = {"pixart": BASE_DEFAULTS["pixart"]["text_max_length"],
                      "sd3": 77 + BASE_DEFAULTS["sd3"]["text_max_length"], "dit": 8}


# ----------------------------------------------------------------------------- graph analysis


def _scope(node: onnx.NodeProto) -> str:
    """``/model/blocks.0/attn1/MatMul_1`` -> ``/model/blocks.0/attn1``."""
    return node.name.rpartition("/")[0]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference, initializers and Constant nodes."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _reach(start: Iterable[onnx.NodeProto], edges: dict[str, list[onnx.NodeProto]], forward: bool) -> set[str]:
    """Names of nodes reachable from ``start`` (excluded) along ``edges`` (tensor -> nodes)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        node = todo.pop()
        for tensor in node.output if forward else node.input:
            for nxt in edges.get(tensor, ()):
                if nxt.name not in seen:
                    seen.add(nxt.name)
                    todo.append(nxt)
    return seen


def _upcast_islands(model: onnx.ModelProto) -> set[str]:
    """Nodes between float->float Casts of one scope (``.float()`` ... ``.to(dtype)`` in fp32 PyTorch)."""
    nodes, types = list(model.graph.node), _elem_types(model)
    weights = {t.name for t in model.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info
             if v.type.tensor_type.HasField("shape")}
    # .float() of an activation; not the scalar casts torch's SDPA export puts around its scale
    casts = [n for n in nodes if _cast_to(n) == TensorProto.FLOAT and types.get(n.input[0]) == TensorProto.FLOAT
             and ranks.get(n.input[0], 2) >= 2]
    by_scope: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in casts:
        by_scope[_scope(n)].append(n)
    island: set[str] = set()
    for scope, entry in by_scope.items():
        members = [n for n in nodes if _scope(n) == scope]
        consumers, producers = defaultdict(list), defaultdict(list)
        for n in members:
            for t in n.input:
                consumers[t].append(n)
            for t in n.output:
                producers[t].append(n)
        core = {n.name for n in entry} | (_reach(entry, consumers, True) & _reach(entry, producers, False))
        island |= core | _side_inputs(members, core, types, weights)
    return island


def _side_inputs(members: list[onnx.NodeProto], core: set[str], types: dict[str, int], weights: set[str]) -> set[str]:
    """Scope nodes that only feed ``core`` and read no float activation from outside it.

    Constants and shape arithmetic such as ``m ** -0.5`` (Shape -> Gather -> Cast -> Pow):
    kept fp32 with the island instead of rounded to fp16 on the way in.
    """
    by_name = {n.name: n for n in members}
    made_by = {t: n.name for n in members for t in n.output}
    read_by: dict[str, set[str]] = defaultdict(set)
    for n in members:
        for t in n.input:
            read_by[t].add(n.name)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    side = {n.name for n in members} - core
    changed = True
    while changed:  # greatest fixpoint: drop nodes that feed outside, or read a float activation from outside
        changed = False
        for name in sorted(side):
            n, keep = by_name[name], core | side
            leaks = any(not read_by[t] or read_by[t] - keep for t in n.output)
            outside = any(t and t not in weights and types.get(t) in floats and made_by.get(t) not in keep
                          for t in n.input)
            if leaks or outside:
                side.discard(name)
                changed = True
    return side


def _sinusoid_islands(nodes: list[onnx.NodeProto]) -> set[str]:
    """``Sin``/``Cos`` and every node they read from (timestep and position features)."""
    producers = defaultdict(list)
    for n in nodes:
        for t in n.output:
            producers[t].append(n)
    trig = [n for n in nodes if n.op_type in ("Sin", "Cos")]
    return {n.name for n in trig} | _reach(trig, producers, False)


def _shape_derived(model: onnx.ModelProto) -> set[str]:
    """Nodes whose values do not depend on any graph input's values: shape and index arithmetic.

    Position tables, T5's relative-position buckets (``log`` then truncated to an int: fp16
    moves bucket boundaries), ``m ** -0.5`` scales. They hold no activation, so fp32 is free.
    """
    consumers = defaultdict(list)
    for n in model.graph.node:
        for t in n.input:
            consumers[t].append(n)
    start = [n for i in model.graph.input for n in consumers[i.name]]
    data = {n.name for n in start}
    todo = [n for n in start if n.op_type not in ("Shape", "Size")]
    while todo:
        for t in todo.pop().output:
            for nxt in consumers[t]:
                if nxt.name not in data:
                    data.add(nxt.name)
                    if nxt.op_type not in ("Shape", "Size"):  # their values are sizes, not data
                        todo.append(nxt)
    return {n.name for n in model.graph.node if n.name not in data}


def fp32_islands(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Node names an fp16 conversion keeps fp32, by reason (see the module docstring).

    Args:
        model: an fp32 graph with shape-inferred ``value_info`` (element types are enough).

    Returns:
        ``{"upcast": {...}, "sinusoid": {...}, "shape_derived": {...}}``; op types in
        :data:`FP32_OPS` come on top.
    """
    return {"upcast": _upcast_islands(model), "sinusoid": _sinusoid_islands(list(model.graph.node)),
            "shape_derived": _shape_derived(model)}


# ----------------------------------------------------------------------------- fp32 fusions

# onnxruntime.transformers model type whose fusions fit each component (as in its SD demo).
FUSION_MODEL_TYPE = {"transformer": "unet", "vae_decoder": "vae"}
# Fusions into contrib ops only the CUDA EP implements (NHWC convolutions, GroupNorm and its
# Skip/Bias variants): off for graphs the CPU EP must run (the cpu target, parity checks).
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add")
FUSED_OPS = frozenset({"FastGelu", "BiasGelu", "Gelu", "SkipLayerNormalization", "LayerNormalization",
                       "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "GroupNorm",
                       "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd", "MultiHeadAttention", "Attention"})


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each fused op type (:data:`FUSED_OPS`) a graph holds."""
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type in FUSED_OPS and (n.domain == "com.microsoft" or n.op_type == "LayerNormalization"):
            counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def fuse_fp32(model: onnx.ModelProto, component: str, *, cuda_only: bool = False) -> onnx.ModelProto:
    """An fp32 graph with onnxruntime's transformer fusions (FastGelu, SkipLayerNorm, ...).

    Python fusions only (``opt_level=0``): no onnxruntime session optimizations are baked
    in, so the graph stays portable across machines. Nodes the fusions leave alone keep
    their names (the fp32 islands are found on the unfused graph and matched by name).

    Args:
        model: fp32 graph (weights loaded); not modified.
        component: "transformer" or "vae_decoder" (:data:`FUSION_MODEL_TYPE`); others are
            returned unchanged.
        cuda_only: also the fusions only the CUDA EP runs (:data:`CUDA_ONLY_FUSIONS`: the
            VAE's GroupNorm, NHWC convolutions); the result then fails to load on the CPU EP.
    """
    if component not in FUSION_MODEL_TYPE:
        return model
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSION_MODEL_TYPE[component]
    options = FusionOptions(model_type)
    # SkipLayerNorm's fusion needs symbolic shapes; past 2 GB the inference fails and that fusion is skipped
    options.enable_shape_inference = True
    if not cuda_only:
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    for name in ("onnxruntime.transformers", "onnx_model", "fusion_base"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optimizer = optimize_model(copy.deepcopy(model), model_type=model_type, opt_level=0, use_gpu=cuda_only,
                               optimization_options=options)
    fused = optimizer.model
    if any(n.domain == "com.microsoft" for n in fused.graph.node) and not any(
            o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _type_fused_outputs(fused, _elem_types(model))
    return fused


def _type_fused_outputs(model: onnx.ModelProto, before: dict[str, int]) -> None:
    """Give every untyped node output the element type of its first input (fused ops keep the
    dtype), in graph order, so the island and cast analysis below sees every tensor's type."""
    types = {**before, **_elem_types(model)}
    known = {v.name for v in model.graph.value_info} | {o.name for o in model.graph.output}
    for n in model.graph.node:
        for out in n.output:
            if out and out not in types and n.input and n.input[0] in types and n.op_type not in ("Shape", "Cast"):
                types[out] = types[n.input[0]]
            if out and out in types and out not in known:
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(out, types[out], None))
                known.add(out)


# ----------------------------------------------------------------------------- conversion


@dataclass
class Fp16Report:
    """What :func:`convert_to_fp16` did: files written and the fp32 nodes left, by reason."""

    path: Path
    files: list[Path]
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # reason -> count (op types in FP32_OPS: "ops")
    casts_removed: int = 0  # fp32 -> fp16 -> fp32 round trips bypassed
    fusions: dict[str, int] = field(default_factory=dict)  # fused op type -> nodes (fuse_fp32), in the fp16 graph

    def meta(self) -> dict:
        meta = {"fp32_islands": dict(self.fp32_nodes), "io_dtype": "float32"}
        if self.fusions:
            meta["fusions"] = dict(self.fusions)
        return meta


def _bypass_round_trips(model: onnx.ModelProto) -> int:
    """Read ``x`` directly where the converter wrote ``Cast(fp32)(Cast(fp16)(x))`` for fp32 ``x``.

    The converter casts every blocked node's outputs to fp16 and its inputs back, so
    consecutive fp32 nodes would round-trip through fp16; this keeps an island fp32 inside.
    Returns how many casts were bypassed; casts left unread are removed.
    """
    g = model.graph
    types = _elem_types(model)
    made_by = {t: n for n in g.node for t in n.output}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    for n in g.node:
        up = made_by.get(n.input[0]) if _cast_to(n) == TensorProto.FLOAT else None
        if up is not None and _cast_to(up) == TensorProto.FLOAT16 and types.get(up.input[0]) == TensorProto.FLOAT:
            n.input[0] = up.input[0]
            if n.output[0] not in outputs:
                rename[n.output[0]] = up.input[0]  # readers take x itself; the Cast goes
    for n in g.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    bypassed = len(rename)
    read = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Cast" and not any(t in read for t in n.output)]
    for n in dead:
        g.node.remove(n)
    return bypassed


def convert_to_fp16(src: str | Path, dst: str | Path, *, keep_ops: Iterable[str] = FP32_OPS,
                    fuse: str | None = None, cuda_only: bool = False) -> Fp16Report:
    """Convert an fp32 ONNX file to fp16 activations and weights, keeping the fp32 islands.

    Graph inputs and outputs stay float32 (cast at the graph's edges). ``dst`` gets a
    ``.onnx.data`` file beside it past 2 GB, like every litedge graph.

    Args:
        src: fp32 graph written by :mod:`litedge.export.onnx_export` (external data beside it).
        dst: the fp16 graph to write; must differ from ``src``.
        keep_ops: op types kept fp32 besides :func:`fp32_islands` and the converter's list.
        fuse: a component name: fuse in fp32 first (:func:`fuse_fp32`); the islands are
            found on the unfused graph, where ``.float()`` still shows as a Cast.
        cuda_only: with ``fuse``, also the fusions only the CUDA EP runs.
    """
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
    inferred = src.with_name(f".{src.name}.inferred")
    try:  # the path form works past 2 GB; external data stays where it is
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    onnx.load_external_data_for_model(model, str(src.parent))
    islands = fp32_islands(model)
    if fuse is not None:
        model = fuse_fp32(model, fuse, cuda_only=cuda_only)
        present = {n.name for n in model.graph.node}
        islands = {reason: names & present for reason, names in islands.items()}
    ops = set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)  # one line per shared weight
    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, op_block_list=sorted(ops),
        node_block_list=sorted(set().union(*islands.values())),
    )
    removed = _bypass_round_trips(model)
    ONNXModel(model).topological_sort()
    files = save_onnx(model, dst)
    counts = {reason: len(names) for reason, names in islands.items()}
    counts["ops"] = sum(1 for n in model.graph.node if n.op_type in keep_ops)
    fusions = fused_op_counts(model)
    del model
    gc.collect()
    return Fp16Report(dst, files, counts, removed, fusions)


# ----------------------------------------------------------------------------- fidelity


def fp16_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 copy of an fp16 graph that rounds every fp16 tensor to fp16, for checks on a CPU.

    onnxruntime's CPU EP runs most fp16 ops in fp32 and drops the rounding between them, so
    it measures fp16 *weights* only. Here every op computes in fp32 (as CUDA's fp16 GEMMs
    accumulate) and each output the fp16 graph holds in fp16 is rounded through an explicit
    ``Cast(fp16) -> Cast(fp32)`` pair, which the CPU EP keeps: close to what a GPU computes.
    """
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    g = model.graph
    types = _elem_types(model)
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t") and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float32"), a.t.name))
        nodes.append(n)
        for i, out in enumerate(n.output):
            if types.get(out) != TensorProto.FLOAT16:
                continue
            n.output[i] = f"{out}__fp32"
            nodes.append(onnx.helper.make_node("Cast", [n.output[i]], [f"{out}__fp16"], to=TensorProto.FLOAT16,
                                               name=f"{n.name}__round{i}"))
            nodes.append(onnx.helper.make_node("Cast", [f"{out}__fp16"], [out], to=TensorProto.FLOAT,
                                               name=f"{n.name}__widen{i}"))
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("value_info")
    return model




def _check_size(input_shapes: dict[str, list[int]]) -> SampleSize:
    """The SampleSize of one parity check of an fp32 export, from its recorded input shapes."""
    if "input_ids" in input_shapes:
        batch, length = input_shapes["input_ids"]
        return SampleSize(batch, 1, 1, length)
    batch, _, h, w = input_shapes.get("sample") or input_shapes["latent"]
    text = input_shapes.get("encoder_hidden_states")
    return SampleSize(batch, h, w, text[1] if text else 8)


def graph_fidelity(fp32: ExportResult, wrapper: nn.Module, path: Path, *, rtol: float = math.inf) -> dict:
    """An fp16 graph's error vs PyTorch fp32 on the fp32 export's check inputs (CPU EP).

    ``rel_err``/``max_abs_err`` are those of :func:`fp16_emulation` (fp16 rounding after
    every op: what a GPU computes, roughly); ``cpu_ep`` holds the graph itself run on the CPU
    EP (which computes most ops in fp32: a lower bound). ``checks`` as in the fp32 parity.

    Raises:
        LitedgeError: output not finite, or the emulated ``rel_err`` past ``rtol``.
    """
    sizes = [_check_size(c["input_shapes"]) for c in fp32.fidelity["checks"]]
    spec = wrapper.spec()
    cpu_ep = _parity(replace(fp32, path=path, files=model_files(path), sample_inputs={}), wrapper, spec, sizes, rtol)
    emulated = path.with_name(f".{path.stem}.emulated.onnx")
    files = save_onnx(fp16_emulation(onnx.load(str(path))), emulated)
    try:
        fid = _parity(replace(fp32, path=emulated, files=files, sample_inputs={}), wrapper, spec, sizes, rtol)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    fid["cpu_ep"] = {"max_abs_err": cpu_ep["max_abs_err"], "rel_err": cpu_ep["rel_err"]}
    fid["emulated"] = "fp16 rounding after every op, fp32 math (CPU EP)"
    return fid


# ----------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Bucket:
    """One static shape: image (height, width) in pixels and its latent size."""

    image: tuple[int, int]
    factor: int = VAE_SCALE_FACTOR  # the VAE's (BackendOptions.vae_scale_factor)

    @property
    def latent(self) -> tuple[int, int]:
        return self.image[0] // self.factor, self.image[1] // self.factor

    @property
    def key(self) -> str:
        return f"{self.image[0]}x{self.image[1]}"


class CudaBackend(Backend):
    """fp16 activations with fp32 islands, dynamic shapes, int4 (MatMulNBits) or fp16 weights.

    Each component: export fp32 -> convert to fp16 -> (transformer, int4: quantize) -> check
    against PyTorch on the CPU EP -> register. Intermediate graphs are deleted.

    Fused in fp32 before the conversion (:func:`fuse_fp32`): the transformer with the fusions
    every EP runs (FastGelu, SkipLayerNormalization), the VAE decoder also with the
    CUDA-only ones (GroupNorm, NhwcConv), checked through its portable twin.
    """

    static = False
    fusions = True  # fuse in fp32 before converting
    cuda_fusions = True  # include fusions only the CUDA EP implements (the VAE's GroupNorm)

    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        stage(f"transformer ({type(model).__name__}): export to ONNX, fp16 with fp32 islands, parity check")
        self._export("transformer", transformer_wrapper(model), writer, lambda path, **kw: export_transformer(
            model, path, opset=self.target.opset, **kw))

    def vae_decoder(self, vae: nn.Module, writer: BundleWriter) -> None:
        stage("vae_decoder: export to ONNX, fp16, parity check")
        self._export("vae_decoder", VaeDecoderWrapper(vae), writer, lambda path, **kw: export_vae_decoder(
            vae, path, opset=self.target.opset, **kw))

    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder") -> None:
        stage(f"{name}: export to ONNX, fp16, parity check")
        self._export(name, text_encoder_wrapper(encoder), writer, lambda path, **kw: export_text_encoder(
            encoder, path, opset=self.target.opset, **kw))

    # ------------------------------------------------------------------ shared steps

    def _export(self, name: str, wrapper: nn.Module, writer: BundleWriter, export) -> None:
        """One graph (cuda): every shape dynamic."""
        graph = self._graph(name, wrapper, writer.path / f"{name}.onnx", export, {})
        writer.add_component(name, graph["files"][0], inputs=graph["inputs"], outputs=graph["outputs"],
                             shapes="dynamic", extra_files=graph["files"][1:], meta=graph["meta"])

    def _graph(self, name: str, wrapper: nn.Module, out: Path, export, kwargs: dict, key: str = "") -> dict:
        """Export fp32, convert to fp16 (transformer int4: quantize), check; returns files/io/meta."""
        label = f"{name} {key}".strip()
        quantize = name == "transformer" and self.options.weights == "int4"
        fp32 = export(out.with_name(out.stem + ".fp32.onnx"), **kwargs)
        fp16_path = out.with_name(out.stem + ".fp16.onnx") if quantize else out
        fuse = name if self.fusions else None
        cuda_only = fuse == "vae_decoder" and self.cuda_fusions  # the transformer's fusions all run on CPU too
        conv = convert_to_fp16(fp32.path, fp16_path, fuse=fuse, cuda_only=cuda_only)
        # A graph with CUDA-only ops cannot run on the CPU EP: its twin with the portable
        # fusions (same islands, same conversion) is what the parity check runs, and what the
        # runtime loads when the bundle runs on the CPU EP (meta["cpu_graph"]).
        twin = convert_to_fp16(fp32.path, out.with_name(out.stem + ".cpu.onnx"), fuse=fuse) if cuda_only else None
        for path in fp32.files:
            path.unlink()
        meta = {"weights": self.options.weights if name == "transformer" else "fp", **fp32.metadata, **conv.meta()}
        meta["precision"] = "fp16"
        if twin is not None:
            meta["cpu_graph"] = twin.path.name
            meta["fidelity_graph"] = (f"{twin.path.name}: the fusions the CPU EP runs; the CUDA-only ones "
                                      f"({', '.join(sorted(set(conv.fusions) - set(twin.fusions)))}) are checked on "
                                      "a GPU by bench/gpu_check.sh")
        try:
            fid = self._fp16_fidelity(name, label, fp32, wrapper, twin or conv)
        except BaseException:
            for path in twin.files if twin is not None else ():
                path.unlink(missing_ok=True)
            raise
        if fid is None and twin is not None:  # fp16 unusable: both graphs go (the twin's are gone already)
            for path in conv.files:
                path.unlink(missing_ok=True)
            meta.pop("cpu_graph")
            meta.pop("fidelity_graph")
        files = conv.files
        if fid is None:  # fp16 overflowed: keep this component fp32
            fp32 = export(out, **kwargs)
            files, meta["precision"], fid = fp32.files, "fp32", {**fp32.fidelity, "vs": "torch-fp32"}
            meta.pop("fp32_islands", None)
        self.report.fidelity[label.replace(" ", "@")] = fid
        if quantize:
            files, meta["quantization"] = self._int4(label, fp32, wrapper, conv, out)
        if "cpu_graph" in meta:
            files = [*files, *twin.files]
        return {"files": [p.name for p in files], "inputs": fp32.inputs, "outputs": fp32.outputs, "meta": meta}

    def _fp16_fidelity(self, name: str, label: str, fp32: ExportResult, wrapper: nn.Module, conv: Fp16Report) -> dict | None:
        """fp16 graph vs PyTorch; None (fall back to fp32) for a VAE / text encoder fp16 cannot hold."""
        try:
            fid = graph_fidelity(fp32, wrapper, conv.path, rtol=FP16_RTOL)
        except LitedgeError as exc:
            if name == "transformer":
                raise LitedgeError(f"{exc}; the fp16 conversion is broken for this model: use --target cpu "
                                   "and report it") from None
            stage(f"{label}: fp16 output unusable ({exc}); keeping this component fp32")
            for path in conv.files:
                path.unlink()
            return None
        stage(f"{label}: fp16 rel_err {fid['rel_err']:.3g} vs PyTorch fp32 (emulated fp16; "
              f"{fid['cpu_ep']['rel_err']:.3g} on the CPU EP)")
        return fid

    def _int4(self, label: str, fp32: ExportResult, wrapper: nn.Module, conv: Fp16Report, out: Path) -> tuple[list[Path], dict]:
        """Quantize the fp16 graph's linear layers to int4 MatMulNBits at ``out``; deletes the fp16 files."""
        from litedge.quantize.int4 import quantize_int4

        stage(f"{label}: 4-bit weights (MatMulNBits, block 32, symmetric, fp16 scales)")
        quant = quantize_int4(conv.path, out, exclude=self.options.keep_fp)
        for path in conv.files:
            path.unlink()
        fid = graph_fidelity(fp32, wrapper, out)
        stage(f"{label}: {quant.summary()}; rel_err {fid['rel_err']:.3g} vs PyTorch fp32 (emulated fp16; "
              f"{fid['cpu_ep']['rel_err']:.3g} on the CPU EP)")
        self.report.fidelity[f"{label.replace(' ', '@')}_int4"] = fid
        meta = {
            "block_size": quant.block_size, "symmetric": quant.symmetric, "quantized": len(quant.quantized),
            "left_fp32": quant.left_fp32, "size_before": quant.size_before, "size_after": quant.size_after,
        }
        self.report.quantization[label.replace(" ", "@")] = meta
        return model_files(quant.path), meta


class DirectMLBackend(CudaBackend):
    """The cuda graphs with static shapes: one transformer and VAE graph per ``--sizes`` bucket.

    Transformer batch 2 (cond + uncond), VAE batch 1, text encoder batch 2; prompt length
    fixed per model kind (:data:`STATIC_TEXT_LENGTH`), recorded as ``meta["text_length"]``.
    """

    static = True
    fusions = False  # the DirectML EP lacks most com.microsoft fused kernels: plain ONNX ops only
    cuda_fusions = False

    def __init__(self, target: TargetProfile, options: BackendOptions, report: ExportReport) -> None:
        super().__init__(target, options, report)
        if not options.sizes:
            raise LitedgeError("directml needs static shapes: pass --sizes 512,1024 (image sizes in pixels)")
        factor = options.vae_scale_factor
        bad = [s for s in options.sizes if s <= 0 or s % factor]
        if bad:
            raise LitedgeError(f"--sizes {','.join(map(str, bad))}: image sizes must be positive multiples of "
                               f"{factor}")
        self.buckets = [Bucket((s, s), factor) for s in dict.fromkeys(options.sizes)]
        self.text_length = options.text_max_length or STATIC_TEXT_LENGTH["pixart"]

    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        wrapper = transformer_wrapper(model)
        if wrapper.kind != "pixart" or not self.options.text_max_length:
            self.text_length = STATIC_TEXT_LENGTH[wrapper.kind]
        stage(f"transformer ({type(model).__name__}): static fp16 graphs for {', '.join(b.key for b in self.buckets)} "
              f"(batch {STATIC_BATCH['transformer']}, {self.text_length} tokens)")
        self._buckets("transformer", wrapper, writer, lambda path, bucket: export_transformer(
            model, path, opset=self.target.opset, dynamic=False, sample_size=bucket.latent,
            text_length=self.text_length))

    def vae_decoder(self, vae: nn.Module, writer: BundleWriter) -> None:
        stage(f"vae_decoder: static fp16 graphs for {', '.join(b.key for b in self.buckets)} (batch 1)")
        self._buckets("vae_decoder", VaeDecoderWrapper(vae), writer, lambda path, bucket: export_vae_decoder(
            vae, path, opset=self.target.opset, dynamic=False, sample_size=bucket.latent))

    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder") -> None:
        stage(f"{name}: static fp16 graph ({self.text_length} tokens, batch {STATIC_BATCH['text_encoder']})")
        graph = self._graph("text_encoder", text_encoder_wrapper(encoder), writer.path / f"{name}.onnx",
                            lambda path, **kw: export_text_encoder(encoder, path, **kw),
                            {"opset": self.target.opset, "dynamic": False, "text_length": self.text_length})
        graph["meta"].update(text_length=self.text_length, batch=STATIC_BATCH["text_encoder"])
        # One graph for every bucket: the prompt's shape does not depend on the image size.
        writer.add_component(name, graph["files"][0], inputs=graph["inputs"], outputs=graph["outputs"],
                             shapes=[list(b.image) for b in self.buckets], extra_files=graph["files"][1:],
                             meta=graph["meta"])

    def _buckets(self, name: str, wrapper: nn.Module, writer: BundleWriter, export) -> None:
        """One static graph per bucket; the manifest entry names the first, the rest are extra files."""
        graphs = {}
        for bucket in self.buckets:
            out = writer.path / f"{name}_{bucket.key}.onnx"
            graphs[bucket] = self._graph(name, wrapper, out, lambda path, b=bucket: export(path, b), {}, bucket.key)
        first = graphs[self.buckets[0]]
        meta = {k: v for k, v in first["meta"].items() if k != "quantization"}
        meta.update(batch=STATIC_BATCH[name], buckets={b.key: g["files"][0] for b, g in graphs.items()},
                    bucket_meta={b.key: {"inputs": g["inputs"], "outputs": g["outputs"],
                                         **({"quantization": g["meta"]["quantization"]} if "quantization" in g["meta"]
                                            else {}), "precision": g["meta"]["precision"]}
                                 for b, g in graphs.items()})
        if name == "transformer":
            meta["text_length"] = self.text_length
        files = [f for g in graphs.values() for f in g["files"]]
        writer.add_component(name, files[0], inputs=first["inputs"], outputs=first["outputs"],
                             shapes=[list(b.image) for b in self.buckets], extra_files=files[1:], meta=meta)
