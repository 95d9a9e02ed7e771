"""The Core ML backend of the coreml target: one ``.mlpackage`` per component, one function per bucket.

Each component is traced with ``torch.jit.trace`` once per resolution bucket (a traced
graph bakes the position embedding and LiT's reshape sizes, docs/design.md), converted by
coremltools to an ML program (fp16 compute, iOS18 / macOS15), optionally compressed to
4-bit block-wise weights, and the per-bucket programs are combined with
``ct.utils.save_multifunction`` into one package whose functions share deduplicated
weights. Function ``latent_{h}x{w}`` serves the image bucket ``{8h}x{8w}``.

Shapes are fixed inside a function (what the Neural Engine wants): the transformer takes
a batch of 2 (a classifier-free guidance pair) and the base model's prompt length, the
VAE decoder and the text encoder a batch of 1. The manifest states them.

A text encoder past :data:`WHOLE_TEXT_ENCODER_BYTES` of fp32 weights (T5-XXL, 19 GB) is not
converted: Core ML conversion holds the whole model in PyTorch and in MIL at once. It is
written by the cpu target's streamed exporter instead (one tensor at a time, int4
MatMulNBits), an ONNX component for onnxruntime on the Mac (meta ``format: onnx``).

Conversion, compression and saving run anywhere; Core ML *prediction* needs macOS, so the
Core ML-vs-PyTorch parity check is recorded as skipped. What is checked here instead: the
TorchScript trace that is converted matches the eager wrapper at every bucket on fresh
inputs, and every converted program holds no tensor above rank 5.

Example::

    lit-export ./lit-student --target coreml --sizes 512,1024 -o lit-coreml.litedge
    # on a Mac: ct.models.MLModel("lit-coreml.litedge/transformer.mlpackage", function_name="latent_128x128")
"""

from __future__ import annotations

import fnmatch
import gc
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.backend import Backend, stage
from litedge.export.bundle_export import BASE_DEFAULTS
from litedge.export.rewrites import inference_mode_of
from litedge.export.specs import (
    ComponentSpec,
    SampleSize,
    TensorSpec,
    TextEncoderWrapper,
    VaeDecoderWrapper,
    transformer_wrapper,
)
from litedge.models.weights import WeightSource

try:
    import coremltools as ct
    import coremltools.optimize as cto
    from coremltools.proto import MIL_pb2
except ImportError as exc:  # load_backend turns this into "pip install 'litedge[coreml]'"
    raise ModuleNotFoundError(str(exc), name="coremltools") from exc

DEPLOYMENT_TARGET = "iOS18"  # = macOS15: block-wise int4 (constexpr_blockwise_shift_scale) and multifunction
MAX_RANK = 5  # Core ML's limit for tensors in multi-shape programs
BLOCK_SIZE = 32
WEIGHT_THRESHOLD = 2048  # coremltools leaves weights of at most this many elements uncompressed
PREDICTION_SKIPPED = "Core ML prediction needs macOS"
TRACE_RTOL = 1e-5  # the TorchScript trace runs the same kernels as eager PyTorch
# Linear attention accumulates K^T V and its normalizer in fp32 (docs/design.md): these MIL ops stay
# fp32 in the otherwise fp16 transformer (linear layers and softmax attention are other ops), and so
# do the elementwise ops fed by them: 1 / (q . mean(k) + eps) is 1e6 for an all-zero ReLU query,
# past fp16's 65504.
FP32_OPS = frozenset({"matmul", "reduce_mean", "reduce_sum"})
FP32_FOLLOWERS = frozenset({"add", "sub", "mul", "real_div", "inverse"})
TRANSFORMER_BATCH = 2  # cond + uncond in one call
WEIGHT_OPS = ("linear", "conv", "conv_transpose", "matmul")
_BUCKET_DIMS = ("height", "width", "image_height", "image_width")  # vary per function; the rest is fixed
# Text encoders with more fp32 weight bytes than this go through the streamed ONNX export
# (T5-XXL: 19 GB; converting it whole would hold it in PyTorch and in MIL at once).
WHOLE_TEXT_ENCODER_BYTES = 2 * 10**9
ONNX_COMPONENT = {"format": "onnx", "providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
                  "note": "too large to convert whole to Core ML in bounded memory: an ONNX graph (int4 MatMulNBits "
                          "weights) for onnxruntime on the Mac, run once per prompt beside the Core ML transformer"}


@dataclass(frozen=True)
class Bucket:
    """One static resolution: image (height, width) in px and its latent (height, width)."""

    image: tuple[int, int]
    latent: tuple[int, int]

    @property
    def key(self) -> str:
        return f"{self.image[0]}x{self.image[1]}"

    @property
    def function(self) -> str:
        return f"latent_{self.latent[0]}x{self.latent[1]}"


def buckets(sizes: Sequence[int], vae_scale_factor: int = 8) -> list[Bucket]:
    """Square buckets from ``--sizes`` (image px), deduplicated in order.

    Raises:
        LitedgeError: no sizes (Core ML needs fixed shapes), or a size not divisible by the VAE factor.
    """
    if not sizes:
        raise LitedgeError("coreml needs resolution buckets: pass --sizes 512,1024")
    out = []
    for s in dict.fromkeys(sizes):
        if s <= 0 or s % vae_scale_factor:
            raise LitedgeError(f"--sizes {s}: expected a positive multiple of the VAE factor {vae_scale_factor}")
        out.append(Bucket((s, s), (s // vae_scale_factor, s // vae_scale_factor)))
    return out


# ----------------------------------------------------------------------------- coremltools gaps


def _register_new_ones() -> None:
    """coremltools 9.0 has no converter for ``Tensor.new_ones``, which transformers' T5 mask code
    calls (``q_idx.new_ones((), dtype=torch.bool)``); register one unless coremltools has its own."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE

    if _TORCH_OPS_REGISTRY.get_func("new_ones") is not None:
        return

    def new_ones(context, node):
        inputs = _get_inputs(context, node)
        code = inputs[2].val if len(inputs) > 2 and inputs[2] is not None else None
        dtype = NUM_TO_NUMPY_DTYPE.get(code, np.float32) if code is not None else np.float32
        dtype = np.int32 if np.issubdtype(dtype, np.integer) else dtype  # Core ML has no int64 tensors
        shape = inputs[1]
        if not isinstance(shape, list) and shape.val is not None:  # fixed shape: a constant
            context.add(mb.const(val=np.ones(tuple(int(d) for d in np.atleast_1d(shape.val) if shape.val.size),
                                             dtype=dtype), name=node.name))
            return
        shape = mb.concat(values=shape, axis=0) if isinstance(shape, list) else shape
        ones = mb.fill(shape=shape, value=1.0)
        context.add(mb.cast(x=ones, dtype={np.bool_: "bool", np.int32: "int32"}.get(dtype, "fp32"), name=node.name))

    register_torch_op(new_ones)


_register_new_ones()


def _register_reciprocal_of_int() -> None:
    """A trace records ``1.0 / k.shape[-1]`` (the channel-first linear attention's 1/M) as
    ``reciprocal`` of an int32 size, which MIL's ``inverse`` refuses (fp16/fp32 only): cast an
    integer input to fp32 first; a float input converts as coremltools does."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    def reciprocal(context, node):
        x = _get_inputs(context, node, expected=1)[0]
        if types.is_int(x.dtype):
            x = mb.cast(x=x, dtype="fp32", name=f"{node.name}_fp32")
        context.add(mb.inverse(x=x, name=node.name))

    register_torch_op(reciprocal, override=True)


_register_reciprocal_of_int()


# ----------------------------------------------------------------------------- program inspection


@dataclass
class ProgramSummary:
    """What one function of an ML program holds, read from the saved protobuf (no macOS needed).

    Attributes:
        ops: op type -> count (nested blocks included).
        max_rank: the largest rank of any function input or op output.
        int4_weights: names of the INT4 constants (the data of ``constexpr_blockwise_shift_scale``).
        fp_weights: ``"op_type weight_name shape (why)"`` of weight-bearing ops whose weight is a
            plain (unquantized) constant.
        fp32_ops: op type -> count of computing ops (not const/cast) with fp32 outputs.
    """

    ops: Counter = field(default_factory=Counter)
    max_rank: int = 0
    int4_weights: list[str] = field(default_factory=list)
    fp_weights: list[str] = field(default_factory=list)
    fp32_ops: Counter = field(default_factory=Counter)


def _walk(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk(inner)


def _shape(value_type) -> list[int]:
    return [d.constant.size if d.HasField("constant") else -1 for d in value_type.tensorType.dimensions]


def _why_fp(op_type: str, shape: list[int]) -> str:
    """Why linear_quantize_weights left a weight as is: too small, or its input dim is not a block multiple."""
    if len(shape) > 1 and shape[1] % BLOCK_SIZE:  # the block runs along the input channels
        return f"input dim {shape[1]} not a multiple of {BLOCK_SIZE}"
    if int(np.prod(shape)) <= WEIGHT_THRESHOLD:
        return f"<= {WEIGHT_THRESHOLD} elements"
    return "excluded by --keep-fp" if op_type != "matmul" else "matmul operand"


def summarize_program(spec, function_name: str) -> ProgramSummary:
    """Summarize ``function_name`` of an ML program spec (``MLModel(path, skip_model_load=True)._spec``)."""
    functions = spec.mlProgram.functions
    if function_name not in functions:
        raise LitedgeError(f"ML program has no function {function_name!r}: it has {sorted(functions)}")
    fn = functions[function_name]
    block = fn.block_specializations[fn.opset]
    summary = ProgramSummary(max_rank=max((i.type.tensorType.rank for i in fn.inputs), default=0))
    producers, const_types = {}, {}
    for op in _walk(block):
        summary.ops[op.type] += 1
        for out in op.outputs:
            producers[out.name] = op.type
            const_types[out.name] = out.type
            summary.max_rank = max(summary.max_rank, out.type.tensorType.rank)
            if out.type.tensorType.dataType == MIL_pb2.DataType.FLOAT32 and op.type not in ("const", "cast"):
                summary.fp32_ops[op.type] += 1
        for arg in op.inputs.get("data", MIL_pb2.Argument()).arguments if op.type.startswith("constexpr") else ():
            value_type = arg.value.type if arg.HasField("value") else const_types.get(arg.name)
            if value_type is not None and value_type.tensorType.dataType == MIL_pb2.DataType.INT4:
                summary.int4_weights.append(op.outputs[0].name)
        if op.type in WEIGHT_OPS:
            key = "weight" if op.type != "matmul" else "y"
            for arg in op.inputs.get(key, MIL_pb2.Argument()).arguments:
                if arg.name and producers.get(arg.name) == "const":
                    shape = _shape(const_types[arg.name])
                    summary.fp_weights.append(f"{op.type} {arg.name} {shape} ({_why_fp(op.type, shape)})")
    return summary


def _check_ranks(spec, function_name: str, component: str) -> ProgramSummary:
    summary = summarize_program(spec, function_name)
    if summary.max_rank > MAX_RANK:
        raise LitedgeError(
            f"{component} function {function_name} has a rank-{summary.max_rank} tensor, Core ML allows <= {MAX_RANK}: "
            "a rewrite in litedge.export.rewrites is missing for this model; report it"
        )
    return summary


# ----------------------------------------------------------------------------- the fixed steps


@dataclass
class Converted:
    """One bucket's converted program and the trace-vs-eager check of the graph it came from."""

    model: object  # ct.models.MLModel
    trace_check: dict
    fixed: ComponentSpec


def _trace(wrapper: nn.Module, args: tuple, size: SampleSize) -> tuple[torch.jit.ScriptModule, dict]:
    """Trace at ``args``; compare the trace with eager PyTorch on fresh inputs of the same shapes."""
    with inference_mode_of(wrapper), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, args, check_trace=False)
        fresh = wrapper.sample_inputs(size, seed=1)
        ref, got = wrapper(*fresh), traced(*fresh)
    err = float((got - ref).abs().max())
    rel = err / max(float(ref.abs().max()), 1e-12)
    check = {"shape": list(ref.shape), "max_abs_err": err, "rel_err": rel}
    if not rel <= TRACE_RTOL:
        raise LitedgeError(f"traced graph differs from PyTorch by rel_err {rel:.3g} at output shape {list(ref.shape)}, "
                           f"expected <= {TRACE_RTOL:g}: the model has input-dependent Python control flow; report it")
    return traced, check


def _tensor_types(spec: ComponentSpec, args: tuple) -> list:
    """Fixed-shape Core ML inputs; int64 inputs become int32 (Core ML has no int64 I/O)."""
    return [
        ct.TensorType(name=t.name, shape=tuple(a.shape), dtype=np.int32 if a.dtype == torch.int64 else np.float32)
        for t, a in zip(spec.inputs, args)
    ]


def _fixed_spec(spec: ComponentSpec, args: tuple, out_shape: Sequence[int], keep: Sequence[str]) -> ComponentSpec:
    """The spec with its dimensions fixed to the traced sizes except those named in ``keep``."""

    def fix(t: TensorSpec, shape: Sequence[int]) -> TensorSpec:
        dims = tuple(d if isinstance(d, str) and d in keep else int(s) for d, s in zip(t.shape, shape))
        return TensorSpec(t.name, "int32" if t.dtype == "int64" else t.dtype, dims)

    return ComponentSpec(tuple(fix(t, a.shape) for t, a in zip(spec.inputs, args)), (fix(spec.outputs[0], out_shape),))


def _fp16_selector(fp32_ops: frozenset[str]):
    """``op -> True`` for ops to run in fp16: all but ``fp32_ops`` and the elementwise ops they feed."""
    kept: dict[int, bool] = {}

    def keep_fp32(op) -> bool:
        if id(op) not in kept:
            kept[id(op)] = False  # no cycles in a MIL block; guards the recursion anyway
            producers = [v.op for arg in op.inputs.values() for v in (arg if isinstance(arg, (list, tuple)) else [arg])
                         if getattr(v, "op", None) is not None]
            kept[id(op)] = op.op_type in fp32_ops or (
                bool(fp32_ops) and op.op_type in FP32_FOLLOWERS and any(keep_fp32(p) for p in producers))
        return kept[id(op)]

    return lambda op: not keep_fp32(op)


def convert_bucket(wrapper: nn.Module, size: SampleSize, *, fp32: bool, fp32_ops: frozenset[str] = frozenset(),
                   keep_symbolic: Sequence[str] = ()) -> Converted:
    """Trace ``wrapper`` at ``size`` and convert it to an ML program with fixed input shapes.

    ``fp32`` converts with fp32 compute; otherwise fp16 except the MIL op types in ``fp32_ops``.
    """
    spec: ComponentSpec = wrapper.spec()
    args = wrapper.sample_inputs(size)
    traced, check = _trace(wrapper, args, size)
    if fp32:
        precision = ct.precision.FLOAT32
    else:
        precision = ct.transform.FP16ComputePrecision(op_selector=_fp16_selector(fp32_ops))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(
            traced, source="pytorch", inputs=_tensor_types(spec, args),
            outputs=[ct.TensorType(name=n) for n in spec.output_names], convert_to="mlprogram",
            compute_precision=precision, minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
            skip_model_load=True,
        )
    del traced
    return Converted(model, check, _fixed_spec(spec, args, check["shape"], keep_symbolic))


def _quant_config(spec, function_name: str, keep_fp: Sequence[str]) -> cto.coreml.OptimizationConfig:
    """int4 linear symmetric, block 32 along the input channels; ``keep_fp`` patterns match weight names."""
    config = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                block_size=BLOCK_SIZE, weight_threshold=WEIGHT_THRESHOLD)
    fn = spec.mlProgram.functions[function_name]
    names = [o.name for op in _walk(fn.block_specializations[fn.opset]) if op.type == "const" for o in op.outputs]
    patterns = [f"*{p.replace('.', '_')}*" for p in keep_fp]
    kept = {n: None for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
    return cto.coreml.OptimizationConfig(global_config=config, op_name_configs=kept or None)


def compress_int4(model, keep_fp: Sequence[str] = ()):
    """4-bit block-wise weights (``constexpr_blockwise_shift_scale``); fp16 where a dim does not divide 32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.coreml.linear_quantize_weights(model, _quant_config(model._spec, "main", keep_fp))


def save_functions(models: dict[str, object], out: Path, default: str) -> None:
    """Save one ``.mlpackage`` at ``out`` holding each model's ``main`` as a named function."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            path = tmp / f"{name}.mlpackage"
            model.save(str(path))
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        ct.utils.save_multifunction(desc, str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _release_weights(model: nn.Module) -> None:
    """Free a module's PyTorch weights: moved to the meta device (config and module tree kept).

    export_bundle reads only the transformer's config after it is exported.
    """
    model.to("meta")
    gc.collect()


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the backend


class CoreMLBackend(Backend):
    """``.mlpackage`` components, one function per ``--sizes`` bucket, fp16 compute, int4 or fp16 weights."""

    # T5 encoders arrive as skeletons with their weights on disk: a large one streams to ONNX.
    streams = frozenset({"text_encoder"})

    def __init__(self, target, options, report) -> None:
        super().__init__(target, options, report)
        self.buckets = buckets(options.sizes, options.vae_scale_factor)  # refuse a missing --sizes before any model is loaded
        self.text_length = options.text_max_length or BASE_DEFAULTS["pixart"]["text_max_length"]

    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        wrapper = transformer_wrapper(model)
        # PixArt pads prompts to 300 T5 tokens; SD3 joins 77 CLIP tokens and 256 T5 tokens; DiT has none.
        lengths = {"pixart": self.text_length, "sd3": 77 + BASE_DEFAULTS["sd3"]["text_max_length"]}
        self.text_length = lengths.get(wrapper.kind, 1)
        sizes = {b: SampleSize(TRANSFORMER_BATCH, *b.latent, self.text_length) for b in self.buckets}
        stage(f"transformer ({type(model).__name__}): trace + convert to Core ML per bucket "
              f"({', '.join(b.key for b in self.buckets)})")
        # Its weights are released after the last trace (2.4 GB for LiT-T2I-XL), before compression.
        self._export("transformer", wrapper, sizes, quantize=self.options.weights == "int4", fp32=False,
                     fp32_ops=FP32_OPS, writer=writer, meta=wrapper.metadata(), release=model)

    def vae_decoder(self, vae: nn.Module, writer: BundleWriter) -> None:
        wrapper = VaeDecoderWrapper(vae)
        # diffusers' force_upcast marks VAEs that overflow in fp16 (the SDXL VAE PixArt-Sigma uses).
        fp32 = bool(getattr(vae.config, "force_upcast", False))
        sizes = {b: SampleSize(1, *b.latent) for b in self.buckets}
        stage(f"vae_decoder: trace + convert to Core ML per bucket ({'fp32' if fp32 else 'fp16'} compute, fp weights)")
        self._export("vae_decoder", wrapper, sizes, quantize=False, fp32=fp32, writer=writer,
                     meta={**wrapper.metadata(), "compute_precision_reason": "force_upcast" if fp32 else "target"})

    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder",
                     weights: WeightSource | None = None) -> None:
        """A T5 encoder as a Core ML package, or, past :data:`WHOLE_TEXT_ENCODER_BYTES` of fp32
        weights (T5-XXL: 19 GB), as the cpu target's streamed ONNX graph (int4 MatMulNBits)
        that onnxruntime runs beside the Core ML transformer: Core ML conversion needs the whole
        model in memory, several times over."""
        if type(encoder).__name__ not in TextEncoderWrapper.supported:
            raise LitedgeError(f"{name}: the coreml target converts T5 text encoders only, not "
                               f"{type(encoder).__name__} (SD3's CLIP encoders); use --target cpu for SD3 bundles")
        if weights is not None:
            fp32_bytes = weights.nbytes_fp32()
            if fp32_bytes > WHOLE_TEXT_ENCODER_BYTES:
                stage(f"{name}: {fp32_bytes / 1e9:.1f} GB of fp32 weights, past the {WHOLE_TEXT_ENCODER_BYTES / 1e9:.1f} GB "
                      "Core ML converts whole in bounded memory: streamed ONNX export for onnxruntime instead")
                self._onnx_backend().text_encoder(encoder, writer, name=name, weights=weights)
                return
            from litedge.models.weights import materialize

            stage(f"{name}: loading its weights whole ({fp32_bytes / 1e9:.2f} GB fp32; Core ML converts the full model)")
            encoder = materialize(encoder, weights)
        wrapper = TextEncoderWrapper(encoder)
        bucket = Bucket((0, 0), (0, 0))
        stage(f"{name}: trace + convert to Core ML ({self.text_length} tokens)")
        # T5 activations overflow fp16 (transformers clamps them in fp16 eager, not in a trace): fp32
        # compute; it runs once per prompt. The weights are still int4 when asked.
        self._export(name, wrapper, {bucket: SampleSize(1, 1, 1, self.text_length)},
                     quantize=self.options.weights == "int4", fp32=True, writer=writer,
                     meta={**wrapper.metadata(), "compute_precision_reason": "T5 overflows fp16"},
                     function=f"text_{self.text_length}", optional=True)

    # ------------------------------------------------------------------ shared steps

    def _onnx_backend(self):
        """The cpu target's (streamed) ONNX exporter, for components too large to convert whole."""
        from litedge.export.onnx_backend import OnnxBackend
        from litedge.export.targets import get_target

        onnx = OnnxBackend(get_target("cpu"), self.options, self.report)
        onnx.support_meta = ONNX_COMPONENT
        return onnx

    def _convert(self, name: str, wrapper: nn.Module, sizes: dict[Bucket, SampleSize], *, quantize: bool,
                 fp32: bool, fp32_ops: frozenset[str], function: str | None,
                 release: nn.Module | None = None) -> tuple[dict, list, ComponentSpec, dict]:
        """Per bucket: trace, convert, compress, check ranks. Returns models, trace checks, spec, summaries.

        ``release``: a module whose weights are freed (:func:`_release_weights`) once the last
        bucket is converted; the converted programs hold their own copy of them.
        """
        models, checks, fixed, summaries = {}, [], None, {}
        for i, (bucket, size) in enumerate(sizes.items()):
            fn = function or bucket.function
            converted = convert_bucket(wrapper, size, fp32=fp32, fp32_ops=fp32_ops,
                                       keep_symbolic=_BUCKET_DIMS if function is None else ())
            if release is not None and i == len(sizes) - 1:
                _release_weights(release)
            model = compress_int4(converted.model, self.options.keep_fp) if quantize else converted.model
            summaries[fn] = _check_ranks(model._spec, "main", name)
            models[fn], fixed = model, converted.fixed
            checks.append({"function": fn, **converted.trace_check})
            del converted  # the uncompressed program, when compressed
            gc.collect()
        return models, checks, fixed, summaries

    def _export(self, name: str, wrapper: nn.Module, sizes: dict[Bucket, SampleSize], *, quantize: bool, fp32: bool,
                writer: BundleWriter, meta: dict, fp32_ops: frozenset[str] = frozenset(),
                function: str | None = None, optional: bool = False, release: nn.Module | None = None) -> None:
        start = time.perf_counter()
        path = writer.path / f"{name}.mlpackage"
        try:
            models, checks, fixed, summaries = self._convert(name, wrapper, sizes, quantize=quantize, fp32=fp32,
                                                             fp32_ops=fp32_ops, function=function, release=release)
            default = next(iter(models))
            save_functions(models, path, default)
        except Exception as exc:  # optional: a coremltools gap must not lose the other components
            if not optional:
                raise
            shutil.rmtree(path, ignore_errors=True)
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            stage(f"{name}: Core ML conversion failed, left out of the bundle ({reason})")
            self.report.fidelity[name] = {"skipped": f"Core ML conversion failed: {reason}"}
            return
        seconds = time.perf_counter() - start
        del models
        gc.collect()
        meta = {**meta, **self._package_meta(path, sizes, function, fp32, quantize, summaries[default], seconds)}
        if quantize:
            self.report.quantization[name] = meta["quantization"]
        self._fidelity(name, checks)
        # the text encoder is resolution independent: "dynamic" here, its inputs fix the text length
        shapes = [list(b.image) for b in sizes] if function is None else "dynamic"
        writer.add_component(name, path.name, inputs=fixed.manifest_inputs(), outputs=fixed.manifest_outputs(),
                             shapes=shapes, meta=meta)

    def _package_meta(self, path: Path, sizes, function, fp32, quantize, summary: ProgramSummary,
                      seconds: float) -> dict:
        meta = {
            "weights": self.options.weights if quantize else "fp",
            "functions": {b.key: b.function for b in sizes} if function is None else {"text": function},
            "default_function": function or next(iter(sizes)).function,
            "deployment_target": DEPLOYMENT_TARGET, "compute_precision": "float32" if fp32 else "float16",
            "fp32_ops": "all" if fp32 else dict(summary.fp32_ops), "max_rank": summary.max_rank,
            "size_bytes": _size_bytes(path), "convert_seconds": round(seconds, 2),
        }
        if quantize:
            meta["quantization"] = {
                "mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block", "block_size": BLOCK_SIZE,
                "int4_weights": len(summary.int4_weights), "left_fp16": summary.fp_weights,
            }
            stage(f"{path.stem}: {len(summary.int4_weights)} weights int4 (block {BLOCK_SIZE}), "
                  f"{len(summary.fp_weights)} left fp16: {'; '.join(summary.fp_weights) or 'none'}")
        stage(f"{path.stem}: {path.name} {meta['size_bytes'] / 2**20:.2f} MiB in {seconds:.1f} s; "
              f"Core ML prediction check skipped ({PREDICTION_SKIPPED})")
        return meta

    def _fidelity(self, name: str, checks: list[dict]) -> None:
        self.report.fidelity[name] = {"skipped": PREDICTION_SKIPPED, "vs": "torch-fp32"}
        self.report.fidelity[f"{name}_trace"] = {
            "max_abs_err": max(c["max_abs_err"] for c in checks), "rel_err": max(c["rel_err"] for c in checks),
            "vs": "torch-fp32 eager (the traced graph that was converted)", "checks": checks,
        }


__all__ = ["CoreMLBackend", "Bucket", "ProgramSummary", "buckets", "compress_int4", "convert_bucket",
           "save_functions", "summarize_program"]
