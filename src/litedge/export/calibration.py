"""Calibration data for static activation quantization: what the transformer sees while denoising.

Activation ranges taken from random N(0, 1) latents and uniform timesteps miss what a real
loop feeds: latents that grow structured as t falls, and timesteps on the schedule's grid.
:func:`denoising_calibration` runs the PyTorch model itself through a short sampling loop
from random noise (DPM-Solver++ for epsilon models, Euler for flow models, with classifier-
free guidance on a batch of 2: conditional + unconditional) and records the inputs of every
step. Without a text encoder the conditioning is random (text embeddings N(0, 1) with a
padding mask; random class labels for DiT).

Latents are kept at the scale real ones have (std <= :data:`MAX_LATENT_STD`; the VAE's
scaling factor makes clean latents unit-variance): an untrained model's loop diverges
(|x| ~500 after 8 steps on the tiny random models), and a calibration range set by such
latents leaves 16-bit steps too coarse for the inputs a trained model sees.

:func:`minmax_ranges` then runs onnxruntime's MinMax calibrator on those feeds in bounded
memory and writes its calibration cache, which ``quantize_static(calibration_cache_path=...)``
reads instead of calibrating again.

Example::

    from litedge.export.calibration import denoising_calibration, FeedReader
    feeds = denoising_calibration(transformer_wrapper(model), latent=(64, 64), text_length=300)
    reader = FeedReader(feeds)  # an onnxruntime.quantization.CalibrationDataReader
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from litedge.export.rewrites import inference_mode_of
from litedge.export.specs import SampleSize, TransformerWrapper
from litedge.runtime.schedulers import scheduler_from_config, split_learned_sigma

Feed = dict[str, np.ndarray]

# The samplers the base pipelines use (PixArt-Sigma / DiT: DPM-Solver++ 2M on the linear
# beta schedule; SD3: flow-matching Euler with shift 3), as diffusers scheduler configs.
SAMPLER_CONFIGS: dict[str, dict] = {
    "pixart": {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
               "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "solver_order": 2},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}
SAMPLER_CONFIGS["dit"] = SAMPLER_CONFIGS["pixart"]
MAX_LATENT_STD = 1.5


class FeedReader(CalibrationDataReader):
    """A ``CalibrationDataReader`` over a list of feeds (input name -> array), read once."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds: Iterator[Feed] = iter(list(feeds))

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def denoising_calibration(
    wrapper: TransformerWrapper,
    latent: tuple[int, int],
    *,
    text_length: int,
    steps: int = 8,
    trajectories: int = 2,
    guidance_scale: float = 4.5,
    seed: int = 0,
) -> list[Feed]:
    """The transformer's inputs at every step of ``trajectories`` short sampling loops.

    Args:
        wrapper: the export wrapper (:func:`litedge.export.specs.transformer_wrapper`); its
            positional inputs name the feeds.
        latent: latent (h, w), image px / vae factor.
        text_length: prompt tokens of the conditioning (PixArt, SD3).
        steps: sampler steps per trajectory (the schedule spans all of t in [0, 1000)).
        trajectories: loops from independent noise and conditioning.
        guidance_scale: classifier-free guidance between the batch's two halves.

    Returns:
        ``steps * trajectories`` feeds, each at batch 2: ``sample`` (2, C, h, w) float32,
        ``timestep`` (2,) float32, and the conditioning inputs of the wrapper's kind.
        The model runs ``steps - 1`` times per trajectory (the last step's output is not needed).
    """
    feeds, _ = denoising_samples(wrapper, latent, text_length=text_length, steps=steps, trajectories=trajectories,
                                 guidance_scale=guidance_scale, seed=seed, with_outputs=False)
    return feeds


def denoising_samples(
    wrapper: TransformerWrapper,
    latent: tuple[int, int],
    *,
    text_length: int,
    steps: int,
    trajectories: int = 1,
    guidance_scale: float = 4.5,
    seed: int = 0,
    first_step: int = 0,
    with_outputs: bool = True,
) -> tuple[list[Feed], list[np.ndarray]]:
    """Inputs and PyTorch outputs of the transformer along short sampling loops (a fidelity set).

    The loops are :func:`denoising_calibration`'s; feeds are recorded from step index
    ``first_step`` on (earlier steps only move the latent along), so a check at a late,
    structured step costs ``first_step`` extra model calls and no more. The outputs are the
    model's own results in the loop: a reference needs no second PyTorch pass.

    Returns:
        ``(feeds, outputs)``: ``(steps - first_step) * trajectories`` feeds as in
        :func:`denoising_calibration`, and with ``with_outputs`` the raw output of each,
        (2, C_out, h, w) float32 (learned sigma included); empty without.
    """
    if not 0 <= first_step < steps:
        raise ValueError(f"first_step {first_step} must be in [0, steps={steps})")
    spec = wrapper.spec()
    names = spec.input_names
    channels = int(wrapper.model.config.in_channels)
    learned_sigma = int(wrapper.model.out_channels) == 2 * channels
    feeds: list[Feed] = []
    outputs: list[np.ndarray] = []
    for k in range(trajectories):
        gen = torch.Generator().manual_seed(seed + k)
        cond = wrapper.conditioning_samples(SampleSize(2, latent[0], latent[1], text_length), gen)
        scheduler = scheduler_from_config(SAMPLER_CONFIGS[wrapper.kind])
        scheduler.set_timesteps(steps)
        x = torch.randn((1, channels, *latent), generator=gen).numpy() * scheduler.init_noise_sigma  # (1, C, h, w)
        for i, t in enumerate(scheduler.timesteps):
            inputs = (torch.from_numpy(np.repeat(x, 2, axis=0)), torch.full((2,), float(t)), *cond)
            if i >= first_step:
                feeds.append({n: v.numpy().copy() for n, v in zip(names, inputs)})
            if i == len(scheduler.timesteps) - 1 and not with_outputs:
                break  # the last step's output only moves x past the recorded feeds
            with inference_mode_of(wrapper):
                out = wrapper(*inputs).numpy()  # (2, C_out, h, w)
            if with_outputs and i >= first_step:
                outputs.append(out)
            if learned_sigma:
                out = split_learned_sigma(out, channels)
            eps = out[1:] + guidance_scale * (out[:1] - out[1:])  # uncond + g (cond - uncond)
            x = scheduler.step(eps, i, x)
            x = x / max(1.0, float(x.std()) / MAX_LATENT_STD)  # an untrained model's loop diverges
    return feeds, outputs


def minmax_ranges(model: Path, feeds: Sequence[Feed], cache: Path, *, op_types: Sequence[str] | None,
                  external_data: bool) -> Path:
    """Min/max of every tensor onnxruntime's quantizer calibrates, over ``feeds``; a calibration cache.

    The same calibrator as ``quantize_static`` (``MinMaxCalibrater``: ReduceMin/ReduceMax on
    each tensor of ``op_types`` nodes, default options), run differently:

    - its session uses a priority-based execution order. With onnxruntime's default order
      the added Reduce nodes run late and keep their tensors alive: 8 GB peak for a 2-layer
      LiT-T2I-XL at 1024 px, against 1.8 GB for the plain graph (same as priority-based);
    - the calibrator's in-memory copy of the weights is dropped once the augmented graph
      is written (``external_data``: the weights go to a ``.data`` file beside it).

    Args:
        model: the float ONNX graph that will be quantized (opset >= 21 for 16-bit types).
        feeds: input name -> array, one dict per run.
        cache: the JSON file to write (``onnxruntime.quantization.calibrate.save_tensors_data``).
        op_types: the op types to quantize (``StaticQuantConfig.op_types_to_quantize``).
        external_data: write the augmented graph with external data (large models).

    Returns:
        ``cache``, for ``quantize_static(..., calibration_cache_path=cache)``.
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, save_tensors_data

    work = Path(tempfile.mkdtemp(prefix=".calibration-", dir=Path(cache).parent))
    try:
        calibrator = MinMaxCalibrater(str(model), op_types, augmented_model_path=str(work / "augmented.onnx"),
                                      use_external_data_format=external_data)
        calibrator.augment_graph()
        if external_data:
            del calibrator.model.graph.initializer[:]  # in augmented.onnx.data now; the session reads them there
        gc.collect()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, options,
                                                        providers=["CPUExecutionProvider"])
        calibrator.collect_data(FeedReader(feeds))
        ranges = calibrator.compute_data()
        del calibrator
        gc.collect()
        save_tensors_data(ranges, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Path(cache)
