"""Latency of a bundle's components per image size, on one device (torch-free).

For each size: the transformer step (cond + uncond in one batch when the bundle's default
guidance uses classifier-free guidance), the VAE decode, the text encoder (size
independent), and an end-to-end estimate for the bundle's default step count; medians
and min/max over ``repeat`` runs after one warm-up, and the peak resident memory.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from litedge.bundle import Manifest, verify_bundle
from litedge.errors import LitedgeError
from litedge.profile.inputs import synthetic_feed
from litedge.profile.ops import group_op_times
from litedge.runtime.devices import Device, resolve_device
from litedge.runtime.session import ComponentSession


@dataclass
class Timing:
    """Seconds over repeats: median, min, max."""

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


@dataclass
class SizeProfile:
    """One image size: component timings (s), end-to-end estimate (s), peak RSS (MB), op groups (s)."""

    height: int
    width: int
    components: dict[str, Timing] = field(default_factory=dict)
    end_to_end: float = float("nan")
    peak_rss_mb: float = float("nan")
    op_groups: dict[str, float] | None = None


@dataclass
class BundleProfile:
    """A bundle's profile on one device."""

    bundle: str
    family: str
    device: dict
    steps: int  # denoising steps of the end-to-end estimate (the bundle's default)
    batch: int  # transformer batch: 2 with classifier-free guidance
    sizes: list[SizeProfile] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def device_info(device: Device, manifest: Manifest) -> dict:
    """What the numbers were measured on: CPU model and cores, EP, onnxruntime, precision."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "os": platform.system(), "provider": device.provider,
        "onnxruntime": ort.__version__, "precision": manifest.target.get("precision", "?"),
        "weights": manifest.target.get("weights", "?"),
        "simulator": manifest.target.get("format") == "qnn" and platform.machine() in ("x86_64", "AMD64"),
    }


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (Linux); elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_runs(session: ComponentSession, feed: dict[str, np.ndarray], repeat: int, per_call: int = 1) -> Timing:
    session.session.run(None, feed)  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(per_call):
            session.session.run(None, feed)
        samples.append((time.perf_counter() - start) / per_call)
    return Timing.of(samples)


def check_sizes(manifest: Manifest, sizes: list[tuple[int, int]]) -> None:
    """Sizes must be multiples of VAE factor x patch, and inside static buckets if the bundle has them."""
    multiple = int(manifest.model.get("vae_scale_factor", 8)) * int(manifest.model.get("patch_size", 2))
    shapes = manifest.components["transformer"].shapes
    for h, w in sizes:
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise LitedgeError(f"size {h}x{w}: height and width must be positive multiples of {multiple} "
                               "(VAE factor x patch size)")
        if isinstance(shapes, list) and [h, w] not in [list(s) for s in shapes]:
            have = ", ".join(f"{a}x{b}" for a, b in shapes)
            raise LitedgeError(f"size {h}x{w} is not one of this bundle's static shapes ({have}): "
                               "profile those sizes, or re-export with --sizes including it")


def _op_groups(bundle_dir: Path, manifest: Manifest, device: Device, feed: dict[str, np.ndarray],
               repeat: int) -> dict[str, float]:
    """Transformer op time (s per step, mean of ``repeat`` runs after a warm-up) by group."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"litedge-profile-{os.getpid()}")
    path = bundle_dir / manifest.components["transformer"].file
    session = ort.InferenceSession(str(path), sess_options=options, providers=device.providers)
    for _ in range(repeat + 1):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        return group_op_times(trace, manifest.model.get("base", ""), skip_runs=1)
    finally:
        trace.unlink(missing_ok=True)


def profile_bundle(path: str | os.PathLike, sizes: list[tuple[int, int]], *, repeat: int = 5, steps: int = 2,
                   device: str = "auto", ops: bool = False) -> BundleProfile:
    """Profile one bundle at each ``(height, width)`` in pixels.

    Args:
        repeat: timed repeats per component and size (after one warm-up); >= 1.
        steps: transformer calls per timed repeat (the step time is their mean).
        device: "auto" or a device name of :mod:`litedge.runtime.devices`.
        ops: also break the transformer's time down by operator group (``--ops``).
    """
    if repeat < 1:
        raise LitedgeError(f"--repeat {repeat}: need at least 1 timed repeat")
    if steps < 1:
        raise LitedgeError(f"--steps {steps}: need at least 1 transformer step per repeat")
    bundle_dir = Path(path)
    manifest = verify_bundle(bundle_dir)
    check_sizes(manifest, sizes)
    dev = resolve_device(device, manifest.target)
    model = manifest.model
    batch = 2 if float(manifest.defaults.get("guidance_scale", 1.0)) > 1.0 else 1
    text_length = int(model.get("text_max_length") or 0) or 1
    profile = BundleProfile(bundle=bundle_dir.name, family=model.get("family", "?"), device=device_info(dev, manifest),
                            steps=int(manifest.defaults.get("steps", 20)), batch=batch)
    sessions = {name: ComponentSession.open(bundle_dir, name, comp, dev) for name, comp in manifest.components.items()}
    text_time = None
    if "text_encoder" in sessions:
        feed = synthetic_feed(manifest.components["text_encoder"], {"batch": batch, "text_length": text_length})
        text_time = _time_runs(sessions["text_encoder"], feed, repeat)
    factor = int(model.get("vae_scale_factor", 8))
    for h, w in sizes:
        _reset_peak_rss()
        result = SizeProfile(h, w)
        dims = {"batch": batch, "height": h // factor, "width": w // factor, "text_length": text_length}
        feed = synthetic_feed(manifest.components["transformer"], dims)
        result.components["transformer_step"] = _time_runs(sessions["transformer"], feed, repeat, per_call=steps)
        if ops:
            result.op_groups = _op_groups(bundle_dir, manifest, dev, feed, repeat)
        if "vae_decoder" in sessions:
            vae_feed = synthetic_feed(manifest.components["vae_decoder"], {**dims, "batch": 1})
            result.components["vae_decode"] = _time_runs(sessions["vae_decoder"], vae_feed, repeat)
        if text_time is not None:
            result.components["text_encoder"] = text_time
        result.end_to_end = profile.steps * result.components["transformer_step"].median + sum(
            t.median for k, t in result.components.items() if k != "transformer_step")
        result.peak_rss_mb = _peak_rss_mb()
        profile.sizes.append(result)
    return profile
