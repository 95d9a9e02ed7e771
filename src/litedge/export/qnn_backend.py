"""The snapdragon target: static-shape QDQ graphs (16-bit activations) compiled to QNN EPContext.

Per image size in ``--sizes`` (one bucket each; latent = px / 8, batch 2 = conditional +
unconditional, text length fixed) the transformer goes through the same steps:

1. export fp32 ONNX with fixed shapes (legacy exporter, opset 17: docs/design.md, facts);
2. fold constants (onnxruntime basic level: the sin-cos position table becomes one
   initializer, ``MatMul + Add`` becomes ``Gemm``) and decompose ``LayerNormalization``
   into primitives (:func:`litedge.export.qnn_ep.decompose_layernorm` says why);
3. lift the graph to opset 21 (16-bit and 4-bit QDQ need it), calibrate on real denoising
   inputs (:mod:`litedge.export.calibration`) and quantize with onnxruntime's QNN helpers:
   uint16 activations, per-channel int8 (uint8) or int4 (symmetric) weights;
4. compile for the SoC's HTP to an EPContext ``.onnx`` + QNN context ``.bin`` with CPU
   fallback disabled (every node on HTP);
5. run the EPContext graph on the x86 HTP simulator against PyTorch fp32 on held-out
   denoising inputs: the fidelity recorded in the report and the manifest.

All PyTorch work (the export, calibration feeds, the check's inputs and reference outputs)
runs first, for every size; the transformer's weights are then released (the model is
left on the meta device) before onnxruntime loads the graph.

Large graphs (weights past :data:`litedge.export.onnx_io.EXTERNAL_DATA_THRESHOLD`, ~2 GB:
LiT-T2I-XL, 2.4 GB fp32) keep their weights in a ``.onnx.data`` file through every step:
folding, LayerNorm decomposition and the opset lift edit the graph loaded without its
weights, the quantizer writes external data, QNN compiles from the files. They also run on
fewer samples (:data:`LARGE_PLAN`): one 3-step calibration trajectory (3 samples) and a
fidelity check of ONE held-out input (step 2 of a 2-step trajectory, t ~ 500).

The fidelity check runs on the x86 HTP simulator when its estimated time
(:data:`SIMULATOR_GMAC_PER_S`) is within :data:`SIMULATOR_BUDGET_S`. At full size it is not:
the simulator ran 0.085 GMAC/s here (885 s for one call of a 1-layer XL-width graph at
512 px), and LiT-T2I-XL at 1024 px is ~5000 GMAC per call: ~16 h per input. Then the check
(a) loads the compiled EPContext on the simulator (the QNN binary deserializes, every node on
HTP, CPU fallback disabled) without running it, or where its QNN contexts (one per block range,
below) do not fit the simulator together, each context alone, and (b)
runs the QDQ graph on onnxruntime's CPU EP on the held-out input against PyTorch fp32: that is
the quantization error, not HTP's own arithmetic. Measured on LiT-T2I-XL at 1024 px (2 shared
cores): export + parity 22 min (8.6 GB peak), PyTorch feeds 10 min, fold/LayerNorm/opset 11 s,
calibration + QDQ 8 min (8.6 GB), CPU QDQ check of the one held-out input 1.7 min; the
QNN HTP compile (onnxruntime-qnn 2.7) was still running after 17 min at 19.4 GB RSS and was
stopped there: compiling this graph whole does not fit a 24 GB machine yet. A bundle's manifest
says which check ran (``fidelity.buckets[tag].on``, ``.simulator``) and how long each took
(``cpu_s``, ``loaded_s``, ``simulator_s``).

The timestep sinusoid stays in the graph: with uint16 activations it is as accurate as
feeding the features (fp16 HTP is what loses it, docs/design.md). ``--hub DEVICE`` also compiles
and profiles each bucket's QDQ graph on Qualcomm AI Hub (:mod:`litedge.export.qai_hub`).
The VAE decoder and text encoders are exported by the cpu target's (streamed) exporter for
the CPU EP (``meta["providers"]``; fp32 compute, text encoder weights as ``--text-encoder-weights``
or ``--weights``), not for HTP yet.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.backend import BackendOptions, ExportReport, stage
from litedge.export.bundle_export import BASE_DEFAULTS
from litedge.export.calibration import Feed, denoising_calibration, denoising_samples, minmax_ranges
from litedge.export.onnx_backend import OnnxBackend
from litedge.export.onnx_export import ExportResult, export_transformer
from litedge.export.onnx_io import compare
from litedge.export.qai_hub import AIHub
from litedge.export.qnn_ep import (
    Soc,
    block_count,
    compile_context,
    compile_in_parts,
    decompose_layernorm,
    fold_constants,
    get_soc,
    is_large,
    load_each_context,
    qnn_devices,
    qnn_version,
    remove_model,
    simulator_session,
    to_opset,
)
from litedge.export.specs import transformer_wrapper
from litedge.export.targets import TargetProfile

BATCH = 2  # conditional + unconditional in one call
CHECK_SEED = 1000  # held-out trajectories for the fidelity checks
QDQ_OPSET = 21  # 16-bit and 4-bit QuantizeLinear / DequantizeLinear


@dataclass(frozen=True)
class SamplePlan:
    """How many PyTorch / onnxruntime / simulator runs calibration and the fidelity checks take.

    Calibration records every step of ``calibration_trajectories`` loops of
    ``calibration_steps`` steps; the check uses the steps from ``check_first_step`` on of
    ``check_trajectories`` held-out loops of ``check_steps`` steps (the earlier steps only
    move the latent). ``cpu_check`` also runs the QDQ graph on onnxruntime's CPU EP.
    """

    name: str
    calibration_steps: int
    calibration_trajectories: int
    check_steps: int
    check_trajectories: int
    check_first_step: int = 0
    cpu_check: bool = True

    @property
    def check_samples(self) -> int:
        return (self.check_steps - self.check_first_step) * self.check_trajectories

    def describe(self) -> str:
        return (f"{self.calibration_trajectories * self.calibration_steps} calibration and "
                f"{self.check_samples} held-out inputs")

    def describe_check(self) -> str:
        steps = f"step {self.check_first_step + 1}" if self.check_samples == self.check_trajectories else "steps"
        return (f"{steps} of {self.check_trajectories} held-out {self.check_steps}-step trajector"
                f"{'y' if self.check_trajectories == 1 else 'ies'}: {self.check_samples} input(s)")


# Small graphs: 32 calibration samples, 8 held-out checks on the simulator and on CPU.
PLAN = SamplePlan("standard", calibration_steps=8, calibration_trajectories=4, check_steps=4, check_trajectories=2)
# Large graphs (weights in external data; LiT-T2I-XL at 1024 px: one PyTorch call ~2 min on 2 cores):
# one 3-step calibration loop (t ~ 999, 666, 333: 2 PyTorch calls + 3 calibration runs) and one
# held-out input at t ~ 500 (2 PyTorch calls); the CPU QDQ run only where the simulator is not run.
LARGE_PLAN = SamplePlan("large", calibration_steps=3, calibration_trajectories=1, check_steps=2, check_trajectories=1,
                        check_first_step=1, cpu_check=False)


# The x86 HTP simulator (onnxruntime-qnn 2.7, 2 shared cores) ran a 1-layer LiT-T2I-XL-width int4
# graph at 512 px (76 GMAC per call) in 885 s: 0.085 GMAC/s. LiT-T2I-XL at 1024 px (5000 GMAC)
# would take ~16 h per input.
# Large graphs compile as one QNN context per range of this many transformer blocks, each in its
# own process: QNN's HTP preparation of LiT-T2I-XL's whole 1024 px graph passed 19 GB.
BLOCKS_PER_PART = 7
# Past the budget the context is loaded on the simulator but not run; the QDQ graph on the CPU EP
# gives the fidelity figures instead.
SIMULATOR_GMAC_PER_S = 0.085
SIMULATOR_BUDGET_S = 600.0


@dataclass
class _Bucket:
    """One image size between the PyTorch phase and the onnxruntime phase."""

    tag: str
    latent: tuple[int, int]
    result: ExportResult
    plan: SamplePlan
    calibration: list[Feed]
    check: list[Feed]
    reference: list[np.ndarray]
    torch_s: float = 0.0
    gmac: float = 0.0  # multiply-accumulates of one call, estimated (10^9)
CPU_COMPONENT = {"providers": ["CPUExecutionProvider"], "precision": "fp32",
                 "note": "not compiled for QNN HTP: runs on the CPU EP beside the HTP transformer"}


class QnnBackend(OnnxBackend):
    """Transformer: QDQ (a16, int4/int8 weights) -> QNN HTP EPContext per size; others: fp32 ONNX on CPU."""

    support_meta = CPU_COMPONENT
    streams = frozenset({"vae_decoder", "text_encoder"})  # the transformer is quantized for HTP from the whole model

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
        # PyTorch first, for every bucket: the fp32 graph, calibration feeds, the held-out check and
        # its reference outputs. The weights are then released, before onnxruntime loads the graph
        # up to three times over (folding, calibration, quantization, compile).
        work: list[_Bucket] = []
        for px in self.sizes:
            tag = f"{px}x{px}"
            latent = (px // self.options.vae_scale_factor, px // self.options.vae_scale_factor)
            stage(f"transformer {tag}: static fp32 ONNX (batch {BATCH}, latent {latent[0]}x{latent[1]}, "
                  f"text {text_length}), parity check")
            result = export_transformer(model, self._tmp(f"{tag}.fp32.onnx"), opset=self.target.opset, dynamic=False,
                                        sample_size=latent, text_length=text_length)
            plan = LARGE_PLAN if is_large(result.path) else PLAN
            stage(f"transformer {tag}: PyTorch on {plan.describe()}")
            start = time.perf_counter()
            calibration = denoising_calibration(wrapper, latent, text_length=text_length, steps=plan.calibration_steps,
                                                trajectories=plan.calibration_trajectories, guidance_scale=guidance)
            check, reference = denoising_samples(wrapper, latent, text_length=text_length, steps=plan.check_steps,
                                                 trajectories=plan.check_trajectories, guidance_scale=guidance,
                                                 seed=CHECK_SEED, first_step=plan.check_first_step)
            work.append(_Bucket(tag, latent, result, plan, calibration, check, reference,
                                torch_s=round(time.perf_counter() - start, 1), gmac=_gmac(model, latent)))
        wrapper_meta = wrapper.metadata()
        del wrapper
        _release_weights(model)

        files, buckets, fidelity, cpu_fidelity, timings, qdq_models = [], {}, {}, {}, {}, {}
        for bucket in work:
            tag = bucket.tag
            qdq = self._quantize(bucket)
            estimate = bucket.gmac * len(bucket.check) / SIMULATOR_GMAC_PER_S  # seconds on the x86 simulator
            simulate = estimate <= SIMULATOR_BUDGET_S
            if bucket.plan.cpu_check or not simulate:
                stage(f"transformer {tag}: QDQ graph on the CPU EP vs PyTorch fp32 ({len(bucket.check)} held-out input(s))")
                start = time.perf_counter()
                cpu_fidelity[tag] = _fidelity(_cpu_outputs(qdq, bucket.check), bucket.reference)
                cpu_fidelity[tag]["cpu_s"] = round(time.perf_counter() - start, 1)
            stage(f"transformer {tag}: compile to QNN EPContext for {self.soc.name} (HTP v{self.soc.htp_arch})")
            start = time.perf_counter()
            ctx = self._compile(qdq, writer.path / f"transformer_{tag}.onnx", tag)
            timings[tag] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            if simulate:
                fidelity[tag] = _fidelity(_simulator_outputs(ctx[0], self.soc, bucket.check), bucket.reference)
                fidelity[tag].update(on="qnn-htp-simulator-x86", simulator_s=round(time.perf_counter() - start, 1))
            else:  # hours on the simulator: it loads the context (every node on HTP), CPU QDQ gives the figures
                fidelity[tag] = {**cpu_fidelity[tag], "on": "qdq-cpu-ep", "simulator": self._load_check(ctx[0], tag)}
                fidelity[tag]["simulator"].update(
                    ran=False, estimated_run_s=round(estimate),
                    why=f"estimated {estimate / 3600:.1f} h on the x86 HTP simulator (budget {SIMULATOR_BUDGET_S:.0f} s)")
            fidelity[tag].update(torch_s=bucket.torch_s, plan=bucket.plan.name)
            on_cpu = f" (QDQ on CPU {cpu_fidelity[tag]['rel_err']:.3g})" if tag in cpu_fidelity and simulate else ""
            where = (f"HTP simulator (x86) vs PyTorch fp32: rel_err {fidelity[tag]['rel_err']:.3g}{on_cpu} on "
                     f"{len(bucket.check)} held-out input(s) in {fidelity[tag]['simulator_s']} s" if simulate else
                     f"QDQ on CPU vs PyTorch fp32: rel_err {fidelity[tag]['rel_err']:.3g} on {len(bucket.check)} "
                     f"held-out input(s) in {fidelity[tag]['cpu_s']} s; {fidelity[tag]['simulator']['loaded']}, "
                     f"not run there ({fidelity[tag]['simulator']['why']})")
            stage(f"transformer {tag}: {where}, compile {timings[tag]} s")
            files += ctx
            buckets[tag] = ctx[0].name
            qdq_models[tag] = qdq
        meta = self._transformer_meta(wrapper_meta, text_length, buckets, timings, fidelity, qdq_models, work)
        self._record_fidelity(fidelity, cpu_fidelity)
        if self.hub is not None:
            meta["ai_hub"] = self._submit(qdq_models)
        writer.add_component(
            "transformer", files[0].name, inputs=_bucketed(work[0].result.inputs),
            outputs=_bucketed(work[0].result.outputs),
            shapes=[[px, px] for px in self.sizes], extra_files=[p.name for p in files[1:]], meta=meta,
        )

    def finish(self, writer: BundleWriter) -> None:
        self._work.cleanup()

    # ------------------------------------------------------------------ steps

    def _tmp(self, name: str) -> Path:
        return Path(self._work.name) / name

    def _compile(self, qdq: Path, out: Path, tag: str) -> list[Path]:
        """The EPContext model of a QDQ graph: whole, or for a large graph with more than
        :data:`BLOCKS_PER_PART` blocks, one QNN context per block range, each compiled in its own
        process (:func:`litedge.export.qnn_ep.compile_in_parts`)."""
        blocks = block_count(onnx.load(str(qdq), load_external_data=False)) if is_large(qdq) else 0
        if blocks > BLOCKS_PER_PART:
            parts = -(-blocks // BLOCKS_PER_PART)
            stage(f"transformer {tag}: {blocks} blocks compiled as {parts} QNN contexts of <= {BLOCKS_PER_PART} blocks, "
                  "one process each (bounded memory), joined in one EPContext graph")
            return compile_in_parts(qdq, out, self.soc, BLOCKS_PER_PART)
        return compile_context(qdq, out, self.soc)

    def _load_check(self, model: Path, tag: str) -> dict:
        """Load the compiled model on the HTP simulator without running it: whole, or where its
        QNN contexts do not fit the simulator together, each context alone
        (:func:`litedge.export.qnn_ep.load_each_context`). Returns the manifest's record."""
        start = time.perf_counter()
        try:
            session = simulator_session(model, self.soc)
            del session
            gc.collect()
            return {"loaded": "the EPContext loads on the HTP simulator", "loaded_s": round(time.perf_counter() - start, 1)}
        except LitedgeError as exc:
            contexts = len(onnx.load(str(model), load_external_data=False).graph.node)
            if contexts < 2:
                raise
            together = str(exc).split(": ", 2)[-1]  # past "NAME.onnx: the QNN HTP simulator (SOC) cannot load ..."
        stage(f"transformer {tag}: the {contexts} QNN contexts do not load on the HTP simulator together "
              f"({together}); loading each alone")
        each = load_each_context(model, self.soc)
        return {"loaded": f"each of its {contexts} QNN contexts loads alone on the HTP simulator, not all together",
                "loaded_s": round(time.perf_counter() - start, 1), "together": together, "contexts": each}

    def _text_length(self, kind: str) -> int:
        # BackendOptions may carry the user's --text-max-length; otherwise the base model's.
        return int(self.options.text_max_length or BASE_DEFAULTS[kind]["text_max_length"] or 1)

    def _quantize(self, bucket: "_Bucket") -> Path:
        """fp32 graph -> folded, LayerNorm-decomposed, opset 21 -> calibrated QDQ graph; deletes the inputs.

        A large graph (:func:`litedge.export.qnn_ep.is_large`) keeps its weights in external
        data at every step: loaded here without them, edited, saved with the same data file.
        """
        from onnxruntime.quantization import QuantType, quantize_static
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        tag = bucket.tag
        prepared, qdq = self._tmp(f"{tag}.prepared.onnx"), self._tmp(f"{tag}.qdq.onnx")
        stage(f"transformer {tag}: fold constants, decompose LayerNorm, opset {QDQ_OPSET}")
        fold_constants(bucket.result.path, prepared)
        remove_model(bucket.result.path)
        model = onnx.load(str(prepared), load_external_data=False)  # the graph; large weights stay on disk
        decompose_layernorm(model, base_dir=prepared.parent)
        model = to_opset(model, QDQ_OPSET)
        onnx.save(model, str(prepared))
        del model
        gc.collect()
        plan = bucket.plan
        stage(f"transformer {tag}: calibrate on {plan.calibration_trajectories} denoising trajector"
              f"{'y' if plan.calibration_trajectories == 1 else 'ies'} x {plan.calibration_steps} steps, "
              f"quantize (a16, {self.options.weights} per-channel weights)")
        weight_type = QuantType.QInt4 if self.options.weights == "int4" else QuantType.QUInt8
        large = is_large(prepared)
        cache = self._tmp(f"{tag}.calibration.json")
        with _quiet_quantizer():
            config = get_qnn_qdq_config(str(prepared), None, activation_type=QuantType.QUInt16,
                                        weight_type=weight_type, per_channel=True)
            minmax_ranges(prepared, bucket.calibration, cache, op_types=config.op_types_to_quantize,
                          external_data=large)
            bucket.calibration = []
            quantize_static(str(prepared), str(qdq), None, calibration_cache_path=str(cache),
                            calibrate_method=config.calibrate_method, quant_format=config.quant_format,
                            activation_type=config.activation_type, weight_type=config.weight_type,
                            op_types_to_quantize=config.op_types_to_quantize,
                            nodes_to_quantize=config.nodes_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                            per_channel=config.per_channel, reduce_range=config.reduce_range,
                            use_external_data_format=config.use_external_data_format or large,
                            calibration_providers=config.calibration_providers, extra_options=config.extra_options)
        cache.unlink()
        remove_model(prepared)
        gc.collect()
        return qdq

    def _transformer_meta(self, wrapper_meta: dict, text_length: int, buckets: dict, timings: dict,
                          fidelity: dict, qdq_models: dict, work: list["_Bucket"]) -> dict:
        first_qdq = next(iter(qdq_models.values()))
        opset = next(o.version for o in onnx.load(str(first_qdq), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        plans = {b.tag: b.plan for b in work}
        plan = plans[next(iter(plans))]
        quant = {
            "activations": "uint16", "weights": self.options.weights,
            "weight_dtype": "int4 (symmetric)" if self.options.weights == "int4" else "uint8",
            "granularity": "per-channel (Conv, Gemm); per-tensor (MatMul: QNN has no per-channel MatMul)",
            "calibration": {"inputs": "denoising trajectories from noise, random conditioning",
                            "trajectories": plan.calibration_trajectories, "steps": plan.calibration_steps,
                            "method": "minmax", "plan": {t: p.name for t, p in plans.items()}},
            "opset": opset,
        }
        self.report.quantization["transformer"] = quant
        return {
            **wrapper_meta, "weights": self.options.weights, "batch": BATCH, "text_length": text_length,
            "buckets": buckets, "quantization": quant, "timestep": "in-graph sinusoid (uint16 QDQ keeps it)",
            "layernorm": "decomposed to primitives for HTP",
            "qnn": {"soc": self.soc.name, "soc_model": self.soc.soc_model, "htp_arch": self.soc.htp_arch,
                    "backend": "htp", "context_embed_mode": 0, "offload_graph_io_quantization": 0,
                    "onnxruntime_qnn": qnn_version(), "compile_s": timings},
            "fidelity": {"on": sorted({f["on"] for f in fidelity.values()}), "vs": "torch-fp32", "buckets": fidelity,
                         "check": {t: p.describe_check() for t, p in plans.items()}},
        }

    def _record_fidelity(self, fidelity: dict, cpu_fidelity: dict) -> None:
        def worst(per_bucket: dict, vs: str) -> dict:
            return {"max_abs_err": max(f["max_abs_err"] for f in per_bucket.values()),
                    "rel_err": max(f["rel_err"] for f in per_bucket.values()), "vs": vs, "buckets": per_bucket}

        on = {f["on"] for f in fidelity.values()}
        vs = (f"torch-fp32 (QNN HTP simulator, {self.soc.name})" if on == {"qnn-htp-simulator-x86"} else
              "torch-fp32 (per bucket: " + ", ".join(f"{t} {f['on']}" for t, f in fidelity.items()) + ")")
        self.report.fidelity["transformer"] = worst(fidelity, vs)
        if cpu_fidelity:
            self.report.fidelity["transformer_qdq_cpu"] = worst(cpu_fidelity, "torch-fp32 (QDQ graph on CPU EP)")
        if set(fidelity) - set(cpu_fidelity):
            self.report.fidelity.setdefault("transformer_qdq_cpu", {})["skipped"] = {
                tag: "large graph: the HTP simulator check only" for tag in sorted(set(fidelity) - set(cpu_fidelity))}

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


def _gmac(model: nn.Module, latent: tuple[int, int]) -> float:
    """Multiply-accumulates of one transformer call at batch 2, in 10^9: weights x image tokens x batch.

    Linear layers dominate a DiT; the text projection (300 tokens, not the image's) is over-counted.
    """
    patch = int(model.config.patch_size)
    tokens = (latent[0] // patch) * (latent[1] // patch)
    return sum(p.numel() for p in model.parameters()) * tokens * BATCH / 1e9


def _release_weights(model: nn.Module) -> None:
    """Free the transformer's weights (moved to the meta device; config and module tree kept).

    export_bundle reads only the config after the transformer is exported; the PyTorch
    weights would otherwise stay resident (2.4 GB fp32 for LiT-T2I-XL) while onnxruntime
    holds the graph.
    """
    model.to("meta")
    gc.collect()


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

