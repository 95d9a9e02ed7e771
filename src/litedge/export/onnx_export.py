"""ONNX export of the three pipeline components: transformer, VAE decoder, text encoder.

Each ``export_<component>()`` takes the same fixed steps (STYLE habit 5): wrap the model
(:mod:`litedge.export.specs`), export with torch's legacy TorchScript exporter
(``dynamo=False``, opset 17: the dynamo exporter writes an invalid PixArt graph), attach
metadata, save (one file, or ``.onnx`` + ``.onnx.data`` past 2 GB), reload with
onnxruntime, compare with PyTorch at two input shapes (raising past ``rtol``), free memory.

Example::

    from litedge.export.onnx_export import export_transformer
    result = export_transformer(pixart, "out/transformer.onnx", sample_size=(128, 128))
    result.fidelity["rel_err"]  # worst max|ort - torch| / max|torch| over the checks
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnx
import torch
from torch import nn

from litedge.errors import LitedgeError
from litedge.export.onnx_io import compare, cpu_session, save_onnx
from litedge.export.rewrites import dynamic_pos_embed, inference_mode_of
from litedge.export.specs import (
    ComponentSpec,
    SampleSize,
    TensorSpec,
    VaeDecoderWrapper,
    text_encoder_wrapper,
    transformer_wrapper,
)

DEFAULT_OPSET = 17
DEFAULT_RTOL = 1e-4  # fp32 graphs match PyTorch to ~1e-7; 1e-4 leaves room for kernel differences
METADATA_PREFIX = "litedge."


@dataclass
class ExportResult:
    """One exported component.

    ``inputs``/``outputs`` are the bundle manifest's form, name -> ``{"dtype", "shape"}``
    with symbolic dimensions as strings. ``fidelity`` holds the worst ``max_abs_err`` and
    ``rel_err`` (max abs error / max abs PyTorch output) over ``checks``, one per shape.
    ``sample_inputs`` are the first check's inputs, e.g. for ``quantize_int4(check_inputs=...)``.
    """

    component: str
    path: Path
    files: list[Path]
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    metadata: dict
    fidelity: dict = field(default_factory=dict)
    # the first parity check's inputs (name -> array): reuse them to check a quantized graph
    sample_inputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def manifest_entry(self, root: Path | None = None) -> dict:
        """``components[NAME]`` of the bundle manifest, file paths relative to ``root``."""
        root = Path(root) if root is not None else self.path.parent
        shapes = "dynamic" if any(isinstance(d, str) for t in self.inputs.values() for d in t["shape"]) else "static"
        return {
            "file": self.path.relative_to(root).as_posix(),
            "files": [p.relative_to(root).as_posix() for p in self.files],
            "inputs": self.inputs,
            "outputs": self.outputs,
            "shapes": shapes,
            "metadata": self.metadata,
        }


# ----------------------------------------------------------------------------- public API


def export_transformer(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    sample_size: tuple[int, int] | None = None,
    text_length: int = 8,
    check_sizes: Sequence[SampleSize] | None = None,
    rtol: float = DEFAULT_RTOL,
    external_data: bool | None = None,
) -> ExportResult:
    """Export a diffusers PixArt / DiT / SD3 transformer (teacher or student) to ONNX.

    Graph: ``(sample (B,C,h,w) f32, timestep (B,) f32, conditioning...) -> noise_pred
    (B,C_out,h,w) f32``; conditioning per kind in :mod:`litedge.export.specs`. With
    ``dynamic`` the batch, latent height/width (multiples of the patch size) and text length
    are symbolic; the position embedding is computed in-graph from the latent size.

    Args:
        model: fp32 diffusers transformer; left unchanged (rewrites are undone after).
        path: the ``.onnx`` file to write (``.onnx.data`` beside it past 2 GB).
        opset: ONNX opset of the legacy exporter.
        dynamic: symbolic shapes; False fixes every shape to the traced sizes.
        sample_size: latent (h, w) to trace at; default the config's ``sample_size``.
        text_length: prompt tokens to trace at (PixArt, SD3).
        check_sizes: the two (or more) input sizes of the parity check; default the
            traced size at batch 1 and a non-square size at batch 2 with another text length.
        rtol: largest accepted ``max|ort - torch| / max|torch|``.
        external_data: force (True) or forbid (False) a ``.onnx.data`` file; None: past 2 GB.

    Raises:
        LitedgeError: unsupported model, or the exported graph does not match PyTorch.
    """
    wrapper = transformer_wrapper(model)
    cfg = model.config
    h, w = sample_size if sample_size is not None else (int(cfg.sample_size), int(cfg.sample_size))
    p = wrapper.patch_size
    if h % p or w % p or h <= 0 or w <= 0:
        raise LitedgeError(f"sample_size {(h, w)} must be positive multiples of the patch size {p}")
    trace = SampleSize(batch=2, height=h, width=w, text_length=text_length)
    if check_sizes is None and dynamic:
        other = SampleSize(2, h, _other_width(w, p, wrapper.metadata().get("max_width")), max(1, text_length - 3))
        check_sizes = [SampleSize(1, h, w, text_length), other]
    elif check_sizes is None:
        check_sizes = [trace, trace]  # static: the one shape, two random draws
    return _export(
        "transformer", wrapper, path, trace=trace, check_sizes=check_sizes, opset=opset, dynamic=dynamic,
        rtol=rtol, external_data=external_data, rewrite=lambda: dynamic_pos_embed(model),
    )


def export_vae_decoder(
    vae: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    sample_size: tuple[int, int] = (32, 32),
    check_sizes: Sequence[SampleSize] | None = None,
    rtol: float = DEFAULT_RTOL,
    external_data: bool | None = None,
) -> ExportResult:
    """Export the decoder of a diffusers ``AutoencoderKL`` to ONNX.

    Graph: ``latent (B,C,h,w) f32 -> image (B,3,f*h,f*w) f32 in [-1, 1]``, f the VAE scale
    factor (8). The latent is fed as the denoising loop ends with it: the graph applies
    ``1 / scaling_factor`` (and ``shift_factor``) itself; ``metadata["latent_scaling"]`` is
    ``"in-graph"`` to say so. Convert to pixels with ``(image + 1) * 127.5``.

    Args:
        sample_size: latent (h, w) to trace at; the graph accepts other sizes when dynamic.
        Other arguments as :func:`export_transformer`.
    """
    wrapper = VaeDecoderWrapper(vae)
    h, w = sample_size
    trace = SampleSize(1, h, w)
    if check_sizes is None:
        check_sizes = [trace, SampleSize(2, h, w + max(1, w // 2))] if dynamic else [trace, trace]
    return _export("vae_decoder", wrapper, path, trace=trace, check_sizes=check_sizes, opset=opset,
                   dynamic=dynamic, rtol=rtol, external_data=external_data)


def export_text_encoder(
    encoder: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    text_length: int = 16,
    check_sizes: Sequence[SampleSize] | None = None,
    rtol: float = DEFAULT_RTOL,
    external_data: bool | None = None,
) -> ExportResult:
    """Export a transformers T5 encoder or CLIP text encoder with projection to ONNX.

    Graph (T5): ``input_ids (B,L) i64, attention_mask (B,L) i64 -> last_hidden_state (B,L,D) f32``;
    (CLIP): ``input_ids (B,L) i64 -> hidden_states (B,L,D) f32 (penultimate), text_embeds (B,P) f32``.

    Args:
        text_length: tokens to trace at; the graph accepts other lengths when dynamic.
        Other arguments as :func:`export_transformer`.
    """
    wrapper = text_encoder_wrapper(encoder)
    trace = SampleSize(2, 1, 1, text_length)
    if check_sizes is None:
        other = SampleSize(2, 1, 1, max(1, text_length - 5)) if dynamic else trace
        check_sizes = [SampleSize(1, 1, 1, text_length) if dynamic else trace, other]
    return _export("text_encoder", wrapper, path, trace=trace, check_sizes=check_sizes, opset=opset,
                   dynamic=dynamic, rtol=rtol, external_data=external_data)


# ----------------------------------------------------------------------------- the fixed steps


def _export(
    component: str,
    wrapper: nn.Module,
    path: str | Path,
    *,
    trace: SampleSize,
    check_sizes: Sequence[SampleSize],
    opset: int,
    dynamic: bool,
    rtol: float,
    external_data: bool | None,
    rewrite: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ExportResult:
    _check_fp32(wrapper, component)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec: ComponentSpec = wrapper.spec()
    args = wrapper.sample_inputs(trace)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.export-", dir=path.parent))
    try:
        with inference_mode_of(wrapper), rewrite():
            _torch_export(wrapper, args, tmp / "model.onnx", spec, opset, dynamic)
            if not dynamic:
                spec = _fixed(spec, args, _outputs(wrapper(*args)))
        metadata = wrapper.metadata()
        model = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        _attach_metadata(model, component, spec, metadata)
        files = save_onnx(model, path, base_dir=tmp, external=external_data)
        del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = ExportResult(component, path, files, spec.manifest_inputs(), spec.manifest_outputs(), metadata)
    result.fidelity = _parity(result, wrapper, spec, check_sizes, rtol)
    gc.collect()
    return result


def _check_fp32(wrapper: nn.Module, component: str) -> None:
    dtypes = {p.dtype for p in wrapper.parameters()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise LitedgeError(f"{component} has {names} weights: the cpu target exports fp32; call model.float() first")


def _torch_export(wrapper: nn.Module, args: tuple, out: Path, spec: ComponentSpec, opset: int, dynamic: bool) -> None:
    """Trace ``wrapper(*args)`` into the ONNX file ``out``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            args,
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes() if dynamic else None,
            do_constant_folding=True,
        )


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A wrapper's output(s) as a tuple, in the spec's output order."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fixed(spec: ComponentSpec, args: tuple, outs: tuple[torch.Tensor, ...]) -> ComponentSpec:
    """The spec with every symbolic dimension replaced by its traced size."""

    def fix(t: TensorSpec, value: torch.Tensor) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple(int(s) for s in value.shape))

    return ComponentSpec(
        tuple(fix(t, a) for t, a in zip(spec.inputs, args)), tuple(fix(t, o) for t, o in zip(spec.outputs, outs))
    )


def _attach_metadata(model: onnx.ModelProto, component: str, spec: ComponentSpec, metadata: dict) -> None:
    import litedge

    props = {
        "component": component,
        "inputs": json.dumps(spec.manifest_inputs()),
        "outputs": json.dumps(spec.manifest_outputs()),
        "metadata": json.dumps(metadata),
        "created_by": f"litedge {litedge.__version__}",
    }
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(METADATA_PREFIX + key) or model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    model.producer_name = "litedge"


def _other_width(w: int, p: int, max_width: int | None) -> int:
    """A second latent width for the parity check: 2 patches wider (narrower at the limit)."""
    if max_width is None or w + 2 * p <= max_width:
        return w + 2 * p
    return max(p, w - 2 * p)


# ----------------------------------------------------------------------------- parity


def _check_io(session: ort.InferenceSession, spec: ComponentSpec, path: Path) -> None:
    """The reloaded graph must have exactly the spec's inputs and outputs, in order."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise LitedgeError(
            f"{path}: graph has inputs {got_in} and outputs {got_out}, expected {spec.input_names} and "
            f"{spec.output_names}; an input the model ignores is dropped by the exporter: check the wrapper"
        )


def _compare_checked(got: np.ndarray, ref: np.ndarray, rtol: float, where: str) -> dict:
    """``compare(got, ref)``; raise on a shape mismatch, a non-finite value or ``rel_err`` past ``rtol``."""
    if got.shape != ref.shape:
        raise LitedgeError(f"{where}: ONNX output shape {got.shape}, PyTorch {ref.shape}; the graph baked a size")
    figures = compare(got, ref)
    if not np.all(np.isfinite(got)) or not figures["rel_err"] <= rtol:
        raise LitedgeError(
            f"{where}: ONNX Runtime differs from PyTorch by rel_err {figures['rel_err']:.3g} "
            f"(max_abs_err {figures['max_abs_err']:.3g}), expected <= {rtol:g}; "
            "check the export rewrites or report the model"
        )
    return figures


def _parity(result: ExportResult, wrapper: nn.Module, spec: ComponentSpec, sizes: Sequence[SampleSize], rtol: float) -> dict:
    """Run ONNX Runtime and PyTorch on the same random inputs at each size; raise past ``rtol``."""
    session = cpu_session(result.path)
    try:
        _check_io(session, spec, result.path)
        checks = []
        for seed, size in enumerate(sizes, start=1):
            inputs = wrapper.sample_inputs(size, seed=seed)
            with inference_mode_of(wrapper):
                refs = [r.numpy() for r in _outputs(wrapper(*inputs))]
            feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
            gots = session.run(spec.output_names, feeds)
            if not result.sample_inputs:
                result.sample_inputs = feeds
            shapes = {n: list(t.shape) for n, t in zip(spec.input_names, inputs)}
            per_output = {
                name: _compare_checked(got, ref, rtol, f"{result.component} {result.path.name} output {name} "
                                                       f"at input shapes {shapes}")
                for name, got, ref in zip(spec.output_names, gots, refs)
            }
            check = {"input_shapes": shapes, "output_shape": list(gots[0].shape),
                     "max_abs_err": max(f["max_abs_err"] for f in per_output.values()),
                     "rel_err": max(f["rel_err"] for f in per_output.values())}
            if len(per_output) > 1:  # worst over the outputs above, each one here
                check["outputs"] = per_output
            checks.append(check)
        return {
            "max_abs_err": max(c["max_abs_err"] for c in checks),
            "rel_err": max(c["rel_err"] for c in checks),
            "vs": "torch-fp32",
            "checks": checks,
        }
    finally:
        del session
        gc.collect()
