"""Export a component in bounded memory: trace without weights, stream them in, check on a small input.

The fixed steps of :mod:`litedge.export.onnx_export` (STYLE habit 5), rearranged so that no
step holds the whole model:

1. trace the wrapper with ``export_params=False`` (a skeleton with placeholder weights
   traces like the real model; its graph has no weights);
2. fold the parameter-only chains and write each weight from the checkpoint into the
   external data file, quantized as it is written (:mod:`litedge.export.weight_writer`);
3. parity: onnxruntime runs the written graph on a small input; PyTorch runs the same input
   with weights read one layer at a time (:func:`litedge.models.weights.streamed_weights`).
   Quantized graphs are checked twice: against PyTorch with the same dequantized weights
   (exact up to fp32 rounding: any export error shows) and against the fp32 weights (the
   int4/int8 fidelity users care about).

Peak memory: one tensor while writing, the written graph's onnxruntime session plus one
layer's weights during the check.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from litedge.errors import LitedgeError
from litedge.export.onnx_export import (
    DEFAULT_RTOL, ExportResult, _attach_metadata, _check_io, _compare_checked, _outputs,
)
from litedge.export.onnx_io import EXTERNAL_DATA_THRESHOLD, compare, cpu_session, data_path_for
from litedge.export.rewrites import inference_mode_of
from litedge.export.specs import ComponentSpec, SampleSize
from litedge.export.weight_writer import (
    WeightFormat, WeightPlan, dequantize_blocks, plan_weights, quantize_blocks, quantize_table, write_weights,
)
from litedge.models.weights import WeightSource, lookup, parameter_aliases, streamed_weights

INLINE_LIMIT = min(EXTERNAL_DATA_THRESHOLD, 512 * 2**20)  # fp32 weight bytes kept inside the .onnx file
QUANT_SANITY = 0.5  # rel err vs fp32 past which a quantized graph is broken, not merely approximate
KeyOf = Callable[[str], list[str]]


def child_prefix(wrapper: nn.Module) -> KeyOf:
    """Wrapper parameter name -> checkpoint keys: the wrapper's one child's prefix removed (``model.x`` -> ``x``)."""
    prefixes = [f"{name}." for name, _ in wrapper.named_children()]

    def key_of(name: str) -> list[str]:
        return [name[len(p):] for p in prefixes if name.startswith(p)] or [name]

    return key_of


def export_streamed(
    component: str,
    wrapper: nn.Module,
    source: WeightSource,
    path: str | Path,
    *,
    trace: SampleSize,
    check_sizes: Sequence[SampleSize],
    opset: int,
    fmt: WeightFormat = WeightFormat(),
    dynamic: bool = True,
    rtol: float = DEFAULT_RTOL,
    key_of: KeyOf | None = None,
    rewrite: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    external_data: bool | None = None,
    graph_rewrite: Callable[[onnx.ModelProto], object] | None = None,
) -> ExportResult:
    """Export ``wrapper`` (a :mod:`litedge.export.specs` wrapper, real or skeleton weights) reading ``source``.

    Args:
        component: the bundle component name (in messages and metadata).
        source: the weights, by checkpoint key; ``key_of`` maps wrapper names to keys.
        trace: the input sizes to trace at (small: the graph is dynamic).
        check_sizes: input sizes of the parity checks.
        fmt: fp32, or int4/int8 ``MatMulNBits`` weights (and int4 embedding tables).
        external_data: force (True) or forbid (False) a ``.onnx.data`` file; None: past ~2 GB.
        graph_rewrite: changes the traced graph in place before its weights are written (e.g.
            :func:`litedge.export.graph_fusions.fuse_gelu_tanh`); the parity checks run on the result.

    Returns:
        An :class:`ExportResult`; ``fidelity`` holds the exact check and, when quantized,
        ``fidelity["quantized"]`` the error against fp32 weights. ``metadata["quantization"]``
        lists the layers quantized and left fp32.

    Raises:
        LitedgeError: weights missing or of the wrong shape, or a parity check failing.
    """
    path = Path(path)
    key_of = key_of or child_prefix(wrapper)
    spec: ComponentSpec = wrapper.spec()
    graph_model = _trace(wrapper, spec, trace, opset, dynamic, rewrite, path)
    if graph_rewrite is not None:
        graph_rewrite(graph_model)
    thunks, shapes, derived = _weight_inputs(wrapper, graph_model.graph, spec, source, key_of, component)
    plan = plan_weights(graph_model.graph, thunks, fmt)
    weight_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
    # Inline tensors stay in memory until the graph is saved (and must total < 2 GB): anything big goes
    # to the data file as it is written, whatever its quantized size will be.
    external = external_data if external_data is not None else weight_bytes > INLINE_LIMIT
    files = _write(graph_model, plan, fmt, spec, wrapper, path, external, component, weight_bytes)
    metadata = wrapper.metadata()
    result = ExportResult(component, path, files, spec.manifest_inputs(), spec.manifest_outputs(), metadata)
    if fmt.bits is not None:
        metadata["quantization"] = {
            "weights": fmt.label, "block_size": fmt.block_size, "symmetric": True, "quantized": len(plan.layers),
            "left_fp32": plan.left_fp32, "embeddings": plan.embeddings or "fp32",
            "size_before": weight_bytes,
        }
    del graph_model
    gc.collect()
    result.fidelity = _parity(result, wrapper, spec, source, key_of, derived, plan, fmt, check_sizes, rtol)
    gc.collect()
    return result


# ----------------------------------------------------------------------------- steps


@contextlib.contextmanager
def _weights_as_inputs(wrapper: nn.Module, names: list[str]):
    """While active, ``wrapper`` holds no parameters or buffers and takes them as extra positional inputs.

    torch's exporter materializes every parameter it is given (a contiguous fp32 copy each, in
    its shape-inference passes: 10.8 GB for SD3.5-Medium's placeholders); inputs it only traces.
    The wrapper itself is traced (not a module around it), so node names keep their module
    paths (``/model/transformer_blocks.0/attn1/...``), which layer names and op groups read.
    """
    aliases = parameter_aliases(wrapper)
    slots = []  # per name: every (dict, key) holding that tensor (tied weights have several)
    for name in names:
        entry = []
        for alias in aliases.get(name, [name]):
            owner, _, attr = alias.rpartition(".")
            sub = wrapper.get_submodule(owner) if owner else wrapper
            entry.append((sub._parameters if attr in sub._parameters else sub._buffers, attr))
        slots.append(entry)
    hidden = [(table, attr, table.pop(attr)) for entry in slots for table, attr in entry]

    def forward(*args: torch.Tensor):
        n = len(args) - len(slots)
        for entry, tensor in zip(slots, args[n:]):
            for table, attr in entry:
                table[attr] = tensor
        try:
            return type(wrapper).forward(wrapper, *args[:n])
        finally:
            for entry in slots:
                for table, attr in entry:
                    table.pop(attr, None)

    wrapper.forward = forward
    try:
        yield
    finally:
        del wrapper.forward
        for table, attr, value in hidden:
            table[attr] = value


def _trace(wrapper, spec, trace, opset, dynamic, rewrite, path: Path) -> onnx.ModelProto:
    """The wrapper's graph with every weight a graph input named as in the wrapper (nothing folded, nothing stored)."""
    args = wrapper.sample_inputs(trace)
    tensors = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}
    names = list(tensors)
    weights = tuple(t.detach() for t in tensors.values())
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.trace-", dir=path.parent))
    try:
        with inference_mode_of(wrapper), rewrite(), _weights_as_inputs(wrapper, names), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (*args, *weights), str(tmp / "graph.onnx"), dynamo=False,
                opset_version=opset, export_params=False, do_constant_folding=False,
                keep_initializers_as_inputs=True,  # no de-duplication: placeholders all look equal
                input_names=[*spec.input_names, *names], output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes() if dynamic else None,
            )
        return onnx.load(str(tmp / "graph.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weight_inputs(wrapper: nn.Module, graph: onnx.GraphProto, spec: ComponentSpec, source: WeightSource,
                   key_of: KeyOf, component: str):
    """Graph inputs that are weights -> functions reading them; their shapes; buffers the reference must set
    (computed from a parameter, or stored in the checkpoint)."""
    params = dict(wrapper.named_parameters())
    aliases = parameter_aliases(wrapper)
    buffers = dict(wrapper.named_buffers())
    derived = wrapper.derived_weights() if hasattr(wrapper, "derived_weights") else {}
    expected = {}
    for name, p in params.items():
        key = lookup(source, [k for a in aliases.get(name, [name]) for k in key_of(a)])
        if key is None:
            raise LitedgeError(f"{component}: the checkpoint has no tensor {key_of(name)[0]}: it does not match its config.json")
        expected[key] = tuple(p.shape)
    source.check_shapes(expected, component)

    def read(name: str) -> torch.Tensor:
        key = lookup(source, [k for a in aliases.get(name, [name]) for k in key_of(a)])
        return source.get(key)

    thunks, shapes, derived_values = {}, {}, {}
    for inp in graph.input:
        name = inp.name
        if name in spec.input_names:
            continue
        if name in derived:
            src, fn = derived[name]
            derived_values[name] = (lambda src=src, fn=fn: fn(read(src)))
            thunks[name] = (lambda f=derived_values[name]: f().numpy())
            shapes[name] = tuple(buffers[name].shape)
        elif name in params:
            thunks[name] = (lambda name=name: read(name).numpy())
            shapes[name] = tuple(params[name].shape)
        elif name in buffers:
            key = lookup(source, key_of(name))
            value = buffers[name].detach()
            thunks[name] = (lambda key=key, value=value: (source.get(key) if key else value).numpy())
            shapes[name] = tuple(value.shape)
            if key is not None:  # a stored buffer (SD3's position table): the reference reads the checkpoint's too
                derived_values[name] = (lambda key=key: source.get(key))
        else:
            raise LitedgeError(f"{component}: traced graph reads {name!r}, which is neither an input nor a weight")
    return thunks, shapes, derived_values


def _write(graph_model: onnx.ModelProto, plan: WeightPlan, fmt: WeightFormat, spec: ComponentSpec, wrapper,
           path: Path, external: bool, component: str, total: int) -> list[Path]:
    """Write the weights (streamed) and the graph; temporary names until both are complete."""
    from litedge.export.backend import stage

    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = data_path_for(path)
    tmp_data = data_path.with_name(f".{data_path.name}.tmp-{id(plan):x}") if external else None
    tmp_graph = path.with_name(f".{path.name}.tmp-{id(plan):x}")
    stage(f"{component}: writing weights ({fmt.label}, {total / 1e9:.2f} GB in fp32{', external data' if external else ''})")
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{component} weights", leave=False,
                  disable=None) as bar:
            inits, _ = write_weights(plan, fmt, tmp_data, progress=bar.update)
        if tmp_data is not None:
            for t in inits:  # the data file's final name
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_path.name
        graph = graph_model.graph
        weight_inputs = [i for i in graph.input if i.name not in spec.input_names]
        for i in weight_inputs:
            graph.input.remove(i)
        graph.ClearField("node")
        graph.node.extend(plan.nodes)
        graph.initializer.extend(inits)
        if fmt.bits is not None and not any(o.domain == "com.microsoft" for o in graph_model.opset_import):
            graph_model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        _attach_metadata(graph_model, component, spec, wrapper.metadata())
        onnx.save_model(graph_model, str(tmp_graph))
        if tmp_data is not None:
            tmp_data.replace(data_path)
        elif data_path.exists():
            data_path.unlink()
        tmp_graph.replace(path)
    except BaseException:
        for p in (tmp_data, tmp_graph):
            if p is not None:
                p.unlink(missing_ok=True)
        raise
    return [path, data_path] if external else [path]


# ----------------------------------------------------------------------------- parity


def _dequantized(plan: WeightPlan, fmt: WeightFormat) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    """``transform(name, tensor)`` giving each quantized weight its stored value; None if a chain is not simple."""
    by_origin: dict[str, tuple[str, str]] = {}
    for const, kind in plan.quantized.items():
        origin, how = plan.origins.get(const, (const, "?"))
        if how == "?" or origin in by_origin:
            return None
        by_origin[origin] = (kind, how)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in by_origin:
            return t
        kind, how = by_origin[name]
        w = np.asarray(t.numpy(), dtype=np.float32)  # no copy: sources serve fp32
        if kind == "gather":
            return torch.from_numpy(_dequantize_table(w, fmt.block_size))
        w = w.T if how == "T" else w
        packed, scales = quantize_blocks(w, fmt.bits, fmt.block_size)
        deq = dequantize_blocks(packed, scales, w.shape[0], fmt.bits, fmt.block_size)
        return torch.from_numpy(np.ascontiguousarray(deq.T if how == "T" else deq))

    return transform


def _dequantize_table(table: np.ndarray, block_size: int) -> np.ndarray:
    """An embedding table as onnxruntime's GatherBlockQuantized reads it back (every row looked up, in chunks)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from litedge.export.weight_writer import TABLE_ROWS

    out = np.empty(table.shape, dtype=np.float32)
    for start in range(0, table.shape[0], TABLE_ROWS):
        chunk = table[start:start + TABLE_ROWS]
        rows, cols = chunk.shape
        q, scales = quantize_table(chunk, block_size)
        graph = helper.make_graph(
            [helper.make_node("GatherBlockQuantized", ["q", "ids", "s"], ["out"], domain="com.microsoft",
                              gather_axis=0, quantize_axis=1, block_size=block_size)],
            "dequantize", [helper.make_tensor_value_info("ids", TensorProto.INT64, [rows])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [rows, cols])],
            [helper.make_tensor("q", TensorProto.INT4, [rows, cols], q.tobytes(), raw=True),
             numpy_helper.from_array(scales, "s")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[start:start + rows] = session.run(None, {"ids": np.arange(rows, dtype=np.int64)})[0]
    return out


def _reference(wrapper, source, key_of, derived, inputs, transform=None) -> list[np.ndarray]:
    buffers = {n: (lambda f=f: f().clone()) for n, f in derived.items()}
    with inference_mode_of(wrapper), streamed_weights(wrapper, source, key_of=key_of, transform=transform, buffers=buffers):
        return [r.numpy() for r in _outputs(wrapper(*inputs))]


def _parity(result: ExportResult, wrapper, spec, source, key_of, derived, plan, fmt, sizes, rtol) -> dict:
    """Run the written graph and PyTorch (weights streamed) at each size; raise past ``rtol``."""
    from litedge.export.backend import stage

    stage(f"{result.component}: parity check at {len(sizes)} small input sizes (weights streamed)")
    transform = _dequantized(plan, fmt) if fmt.bits is not None else None
    session = cpu_session(result.path)
    try:
        _check_io(session, spec, result.path)
        checks, quant_checks = [], []
        for seed, size in enumerate(sizes, start=1):
            inputs = wrapper.sample_inputs(size, seed=seed)
            feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
            gots = session.run(spec.output_names, feeds)
            if not result.sample_inputs:
                result.sample_inputs = feeds
            shapes = {n: list(t.shape) for n, t in zip(spec.input_names, inputs)}
            where = f"{result.component} {result.path.name} at input shapes {shapes}"
            fp32 = _reference(wrapper, source, key_of, derived, inputs)
            if fmt.bits is None:
                exact_refs = fp32
            elif transform is not None:
                exact_refs = _reference(wrapper, source, key_of, derived, inputs, transform)
            else:
                exact_refs = None
            if exact_refs is not None:
                figures = [_compare_checked(g, r, rtol, where) for g, r in zip(gots, exact_refs)]
                check = {"input_shapes": shapes, "max_abs_err": max(f["max_abs_err"] for f in figures),
                         "rel_err": max(f["rel_err"] for f in figures)}
                if len(figures) > 1:  # worst over the outputs above, each one here
                    check["outputs"] = dict(zip(spec.output_names, figures))
                checks.append(check)
            if fmt.bits is not None:
                q = [compare(g, r) for g, r in zip(gots, fp32)]
                worst = max(f["rel_err"] for f in q)
                if not all(np.all(np.isfinite(g)) for g in gots) or worst > QUANT_SANITY:
                    raise LitedgeError(
                        f"{where}: the {fmt.label} graph differs from fp32 PyTorch by rel_err {worst:.3g} (> {QUANT_SANITY}): "
                        "the quantized weights are broken; export with --weights fp and report the model"
                    )
                quant_checks.append({"input_shapes": shapes, "max_abs_err": max(f["max_abs_err"] for f in q),
                                     "rel_err": worst})
        fidelity: dict = {"vs": "torch-fp32" if fmt.bits is None else f"torch-fp32, {fmt.label} weights dequantized"}
        if checks:
            fidelity.update(max_abs_err=max(c["max_abs_err"] for c in checks), rel_err=max(c["rel_err"] for c in checks),
                            checks=checks)
        else:
            fidelity["exact"] = "skipped: a quantized weight is reached through ops the check cannot mirror"
        if quant_checks:
            fidelity["quantized"] = {"vs": "torch-fp32", "weights": fmt.label,
                                     "max_abs_err": max(c["max_abs_err"] for c in quant_checks),
                                     "rel_err": max(c["rel_err"] for c in quant_checks), "checks": quant_checks}
        return fidelity
    finally:
        del session
        gc.collect()

