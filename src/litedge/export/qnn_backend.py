"""The snapdragon target: static-shape QDQ graphs (16-bit activations) compiled to QNN EPContext.

Per image size in ``--sizes`` (one bucket each; latent = px / 8, batch 2 = conditional +
unconditional, text length fixed) the transformer goes through the same steps:

1. export fp32 ONNX with fixed shapes (legacy exporter, opset 17: DESIGN.md, facts);
2. fold constants (onnxruntime basic level: the sin-cos position table becomes one
   initializer, ``MatMul + Add`` becomes ``Gemm``) and decompose ``LayerNormalization``
   into primitives (:func:`litedge.export.qnn_ep.decompose_layernorm` says why);
3. calibrate on real denoising inputs (:mod:`litedge.export.calibration`) and quantize with
   onnxruntime's QNN helpers: uint16 activations, per-channel int8 (uint8) or int4 (symmetric)
   weights; the quantizer lifts the graph to opset 21, which 16-bit and 4-bit QDQ need;
4. compile for the SoC's HTP to an EPContext ``.onnx`` + QNN context ``.bin`` with CPU
   fallback disabled (every node on HTP);
5. run the EPContext graph on the x86 HTP simulator against PyTorch fp32 on a held-out
   trajectory: the fidelity recorded in the report and the manifest.

The timestep sinusoid stays in the graph: with uint16 activations it is as accurate as
feeding the features (fp16 HTP is what loses it, DESIGN.md). ``--hub DEVICE`` also compiles
and profiles each bucket's QDQ graph on Qualcomm AI Hub (:mod:`litedge.export.qai_hub`).
The VAE decoder and text encoder are exported as fp32 ONNX for the CPU EP
(``meta["providers"]``), not for HTP yet.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.backend import BackendOptions, ExportReport, stage
from litedge.export.bundle_export import BASE_DEFAULTS
from litedge.export.calibration import Feed, FeedReader, denoising_calibration
from litedge.export.onnx_backend import OnnxBackend
from litedge.export.onnx_export import ExportResult, export_transformer
from litedge.export.onnx_io import compare
from litedge.export.qai_hub import AIHub
from litedge.export.qnn_ep import (
    Soc,
    compile_context,
    decompose_layernorm,
    fold_constants,
    get_soc,
    qnn_devices,
    qnn_version,
    simulator_session,
)
from litedge.export.rewrites import inference_mode_of
from litedge.export.specs import TransformerWrapper, transformer_wrapper
from litedge.export.targets import TargetProfile

VAE_FACTOR = 8  # image px per latent px
BATCH = 2  # conditional + unconditional in one call
CALIBRATION_STEPS, CALIBRATION_TRAJECTORIES = 8, 4  # 32 samples
CHECK_STEPS, CHECK_TRAJECTORIES, CHECK_SEED = 4, 2, 1000  # held-out inputs for the simulator check
CPU_COMPONENT = {"providers": ["CPUExecutionProvider"], "precision": "fp32",
                 "note": "not compiled for QNN HTP: runs on the CPU EP beside the HTP transformer"}


class QnnBackend(OnnxBackend):
    """Transformer: QDQ (a16, int4/int8 weights) -> QNN HTP EPContext per size; others: fp32 ONNX on CPU."""

    support_meta = CPU_COMPONENT

    def __init__(self, target: TargetProfile, options: BackendOptions, report: ExportReport) -> None:
        super().__init__(target, options, report)
        self.soc: Soc = get_soc(options.soc)
        self.sizes = _check_sizes(options.sizes)
        if options.keep_fp:
            raise LitedgeError("--keep-fp is not supported for --target snapdragon yet: every layer is quantized for HTP")
        qnn_devices()  # onnxruntime-qnn installed and registered, before any export work
        self.hub = AIHub.connect_to(options.hub_device) if options.hub_device else None
        self._work = tempfile.TemporaryDirectory(prefix="litedge-qnn-")

    # ------------------------------------------------------------------ components

    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        wrapper = transformer_wrapper(model)
        text_length = self._text_length(wrapper.kind)
        guidance = float(BASE_DEFAULTS[wrapper.kind]["guidance_scale"])
        files, buckets, fidelity, cpu_fidelity, timings, qdq_models = [], {}, {}, {}, {}, {}
        first: ExportResult | None = None
        for px in self.sizes:
            tag = f"{px}x{px}"
            latent = (px // VAE_FACTOR, px // VAE_FACTOR)
            stage(f"transformer {tag}: static fp32 ONNX (batch {BATCH}, latent {latent[0]}x{latent[1]}, "
                  f"text {text_length}), parity check")
            result = export_transformer(model, self._tmp(f"{tag}.fp32.onnx"), opset=self.target.opset, dynamic=False,
                                        sample_size=latent, text_length=text_length)
            first = first or result
            qdq = self._quantize(wrapper, result, latent, text_length, guidance, tag)
            check = denoising_calibration(wrapper, latent, text_length=text_length, steps=CHECK_STEPS,
                                          trajectories=CHECK_TRAJECTORIES,
                                          guidance_scale=guidance, seed=CHECK_SEED)
            reference = _torch_outputs(wrapper, check)
            cpu_fidelity[tag] = _fidelity(_cpu_outputs(qdq, check), reference)
            stage(f"transformer {tag}: compile to QNN EPContext for {self.soc.name} (HTP v{self.soc.htp_arch})")
            start = time.perf_counter()
            ctx = compile_context(qdq, writer.path / f"transformer_{tag}.onnx", self.soc)
            timings[tag] = round(time.perf_counter() - start, 2)
            fidelity[tag] = _fidelity(_simulator_outputs(ctx[0], self.soc, check), reference)
            stage(f"transformer {tag}: HTP simulator (x86) vs PyTorch fp32: rel_err {fidelity[tag]['rel_err']:.3g} "
                  f"(QDQ on CPU {cpu_fidelity[tag]['rel_err']:.3g}), compile {timings[tag]} s")
            files += ctx
            buckets[tag] = ctx[0].name
            qdq_models[tag] = qdq
            for path in result.files:
                path.unlink()
        meta = self._transformer_meta(wrapper, text_length, buckets, timings, fidelity, qdq_models)
        self._record_fidelity(fidelity, cpu_fidelity)
        if self.hub is not None:
            meta["ai_hub"] = self._submit(qdq_models)
        writer.add_component(
            "transformer", files[0].name, inputs=_bucketed(first.inputs), outputs=_bucketed(first.outputs),
            shapes=[[px, px] for px in self.sizes], extra_files=[p.name for p in files[1:]], meta=meta,
        )

    def finish(self, writer: BundleWriter) -> None:
        self._work.cleanup()

    # ------------------------------------------------------------------ steps

    def _tmp(self, name: str) -> Path:
        return Path(self._work.name) / name

    def _text_length(self, kind: str) -> int:
        # BackendOptions may carry the user's --text-max-length; otherwise the base model's.
        return int(self.options.text_max_length or BASE_DEFAULTS[kind]["text_max_length"] or 1)

    def _quantize(self, wrapper: TransformerWrapper, result: ExportResult, latent: tuple[int, int],
                  text_length: int, guidance: float, tag: str) -> Path:
        from onnxruntime.quantization import QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        prepared, qdq = self._tmp(f"{tag}.prepared.onnx"), self._tmp(f"{tag}.qdq.onnx")
        fold_constants(result.path, prepared)
        model = onnx.load(str(prepared))
        decompose_layernorm(model)
        onnx.save(model, str(prepared))
        del model
        stage(f"transformer {tag}: calibrate on {CALIBRATION_TRAJECTORIES} denoising trajectories x "
              f"{CALIBRATION_STEPS} steps, quantize (a16, {self.options.weights} per-channel weights)")
        feeds = denoising_calibration(wrapper, latent, text_length=text_length, steps=CALIBRATION_STEPS,
                                      trajectories=CALIBRATION_TRAJECTORIES, guidance_scale=guidance)
        weight_type = QuantType.QInt4 if self.options.weights == "int4" else QuantType.QUInt8
        with _quiet_quantizer():
            config = get_qnn_qdq_config(str(prepared), FeedReader(feeds), activation_type=QuantType.QUInt16,
                                        weight_type=weight_type, per_channel=True)
            quantize(str(prepared), str(qdq), config)
        prepared.unlink()
        return qdq

    def _transformer_meta(self, wrapper: TransformerWrapper, text_length: int, buckets: dict, timings: dict,
                          fidelity: dict, qdq_models: dict) -> dict:
        opset = next(o.version for o in onnx.load(str(next(iter(qdq_models.values())))).opset_import
                     if o.domain in ("", "ai.onnx"))
        quant = {
            "activations": "uint16", "weights": self.options.weights,
            "weight_dtype": "int4 (symmetric)" if self.options.weights == "int4" else "uint8",
            "granularity": "per-channel (Conv, Gemm); per-tensor (MatMul: QNN has no per-channel MatMul)",
            "calibration": {"inputs": "denoising trajectories from noise, random conditioning",
                            "trajectories": CALIBRATION_TRAJECTORIES, "steps": CALIBRATION_STEPS, "method": "minmax"},
            "opset": opset,
        }
        self.report.quantization["transformer"] = quant
        return {
            **wrapper.metadata(), "weights": self.options.weights, "batch": BATCH, "text_length": text_length,
            "buckets": buckets, "quantization": quant, "timestep": "in-graph sinusoid (uint16 QDQ keeps it)",
            "layernorm": "decomposed to primitives for HTP",
            "qnn": {"soc": self.soc.name, "soc_model": self.soc.soc_model, "htp_arch": self.soc.htp_arch,
                    "backend": "htp", "context_embed_mode": 0, "offload_graph_io_quantization": 0,
                    "onnxruntime_qnn": qnn_version(), "compile_s": timings},
            "fidelity": {"on": "qnn-htp-simulator-x86", "vs": "torch-fp32", "buckets": fidelity},
        }

    def _record_fidelity(self, fidelity: dict, cpu_fidelity: dict) -> None:
        def worst(per_bucket: dict, vs: str) -> dict:
            return {"max_abs_err": max(f["max_abs_err"] for f in per_bucket.values()),
                    "rel_err": max(f["rel_err"] for f in per_bucket.values()), "vs": vs, "buckets": per_bucket}

        self.report.fidelity["transformer"] = worst(fidelity, f"torch-fp32 (QNN HTP simulator, {self.soc.name})")
        self.report.fidelity["transformer_qdq_cpu"] = worst(cpu_fidelity, "torch-fp32 (QDQ graph on CPU EP)")

    def _submit(self, qdq_models: dict[str, Path]) -> list[dict]:
        entries = []
        for tag, path in qdq_models.items():
            stage(f"transformer {tag}: AI Hub compile + profile on {self.hub.device_name}")
            entry = {"bucket": tag, **self.hub.compile_and_profile(path, name=f"litedge transformer {tag}")}
            stage(f"transformer {tag}: AI Hub {entry.get('status')}, estimated "
                  f"{entry.get('estimated_inference_time_us')} us ({entry.get('profile_url') or entry.get('compile_url')})")
            entries.append(entry)
        self.report.quantization.setdefault("transformer", {})["ai_hub"] = entries
        return entries


# ----------------------------------------------------------------------------- helpers


def _check_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    if not sizes:
        raise LitedgeError("--target snapdragon compiles one static graph per image size: give --sizes, e.g. "
                           "--sizes 512,1024 (pixels, multiples of 16)")
    return tuple(dict.fromkeys(int(s) for s in sizes))


def _bucketed(specs: dict[str, dict]) -> dict[str, dict]:
    """Manifest inputs/outputs: the latent height/width vary by bucket, batch and text length are fixed."""
    out = {}
    for name, spec in specs.items():
        shape = list(spec["shape"])
        if name in ("sample", "noise_pred") and len(shape) == 4:
            shape[2:] = ["height", "width"]
        out[name] = {**spec, "shape": shape}
    return out


def _torch_outputs(wrapper: TransformerWrapper, feeds: list[Feed]) -> list[np.ndarray]:
    names = wrapper.spec().input_names
    with inference_mode_of(wrapper):
        return [wrapper(*(torch.from_numpy(f[n]) for n in names)).numpy() for f in feeds]


def _cpu_outputs(path: Path, feeds: list[Feed]) -> list[np.ndarray]:
    from litedge.export.onnx_io import cpu_session

    session = cpu_session(path)
    return [session.run(None, f)[0] for f in feeds]


def _simulator_outputs(path: Path, soc: Soc, feeds: list[Feed]) -> list[np.ndarray]:
    session = simulator_session(path, soc)
    return [session.run(None, f)[0] for f in feeds]


def _fidelity(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Worst max_abs_err / rel_err over the held-out steps (rel: max |err| / max |torch|, per step)."""
    checks = [compare(g, r) for g, r in zip(got, ref)]
    if not all(np.all(np.isfinite(g)) for g in got):
        raise LitedgeError("the quantized transformer produced NaN or inf: report the model")
    return {"max_abs_err": max(c["max_abs_err"] for c in checks), "rel_err": max(c["rel_err"] for c in checks),
            "mean_rel_err": float(np.mean([c["rel_err"] for c in checks])), "steps": len(checks),
            "inputs": "held-out denoising trajectories"}


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice on the root logger at WARNING; keep stderr to our stages."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)  # its calibration sessions' "removing unused initializer" notes
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)

