"""Latency of a bundle's components per image size, on one device (torch-free).

For each size: the transformer step (cond + uncond in one batch when the bundle's default
guidance uses classifier-free guidance), the VAE decode, the text encoder (size
independent), and an end-to-end estimate for the bundle's default step count; medians
and min/max over ``repeat`` runs after one warm-up, and the peak resident memory.

At most one session is held at a time (each component is opened, measured and released;
``--ops`` releases the timing session before it opens the profiling one), so the peak
memory of a size is that of its largest component, never two copies of the transformer.
Running out of memory is one line (:class:`LitedgeError`), not a traceback.
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
from litedge.profile.ops import op_stats
from litedge.runtime.devices import Device, resolve_device
from litedge.runtime.memory import check_profile_sizes
from litedge.runtime.session import ComponentSession, session_options


@dataclass
class Timing:
    """Seconds over repeats: median, min, max (wall clock), and the median CPU seconds.

    ``cpu`` is this process's CPU time per call (all its threads). With one onnxruntime
    thread it is the step's cost on its core whatever else that core runs: a shared core
    stretches the wall time, not the CPU time (``None`` when not measured).
    """

    median: float
    min: float
    max: float
    repeats: int
    cpu: float | None = None

    @classmethod
    def of(cls, samples: list[float], cpu: list[float] | None = None) -> "Timing":
        return cls(statistics.median(samples), min(samples), max(samples), len(samples),
                   statistics.median(cpu) if cpu else None)


@dataclass
class SizeProfile:
    """One image size: component timings (s), end-to-end estimate (s), peak RSS (MB), op groups (s)."""

    height: int
    width: int
    components: dict[str, Timing] = field(default_factory=dict)
    end_to_end: float = float("nan")
    peak_rss_mb: float = float("nan")
    op_groups: dict[str, float] | None = None
    # --ops: per group seconds / GFLOP / GFLOP/s, seconds per op type, peak arena MB (ops.op_stats)
    op_stats: dict | None = None


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
    """Seconds per ``session`` call: one warm-up (memory planning, arena growth), then ``repeat``
    timed repeats of ``per_call`` calls each."""
    session.session.run(None, feed)  # warm-up
    samples, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(per_call):
            session.session.run(None, feed)
        cpu.append((time.process_time() - start_cpu) / per_call)
        samples.append((time.perf_counter() - start) / per_call)
    return Timing.of(samples, cpu)


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


def _op_stats(bundle_dir: Path, manifest: Manifest, device: Device, feed: dict[str, np.ndarray],
              repeat: int) -> dict:
    """Transformer op time per step by group (:func:`litedge.profile.ops.op_stats`), from
    onnxruntime's profiler over ``repeat`` runs after a warm-up, with the runtime's own options."""
    component = manifest.components["transformer"]
    prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"litedge-profile-{os.getpid()}")
    options = session_options(device, False, component, profile_prefix=prefix)
    path = bundle_dir / component.file
    session = ort.InferenceSession(str(path), sess_options=options, providers=device.providers)
    try:
        for _ in range(repeat + 1):
            session.run(None, feed)
    finally:
        trace = Path(session.end_profiling())
        del session
    try:
        return op_stats(trace, manifest.model.get("base", ""), skip_runs=1)
    finally:
        trace.unlink(missing_ok=True)


_OOM_MARKS = ("failed to allocate memory", "bad_alloc", "out of memory", "cannot allocate memory")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKS)


def _guard_memory(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with running out of memory turned into one LitedgeError line."""
    try:
        return fn(*args, **kwargs)
    except LitedgeError:
        raise
    except Exception as exc:  # noqa: BLE001  ORT raises RuntimeException / Fail; numpy MemoryError
        if not _is_oom(exc):
            raise
        free = _available_mb()
        raise LitedgeError(f"{what}: out of memory ({free:.0f} MB available); profile smaller --sizes, close other "
                           "programs, or for a softmax teacher re-export with lit-export --teacher "
                           "(attention in query chunks)") from None


def _available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


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
    check_profile_sizes(manifest, bundle_dir, sizes, float(manifest.defaults.get("guidance_scale", 1.0)) > 1.0)
    dev = resolve_device(device, manifest.target)
    model = manifest.model
    batch = 2 if float(manifest.defaults.get("guidance_scale", 1.0)) > 1.0 else 1
    text_length = int(model.get("text_max_length") or 0) or 1
    profile = BundleProfile(bundle=bundle_dir.name, family=model.get("family", "?"), device=device_info(dev, manifest),
                            steps=int(manifest.defaults.get("steps", 20)), batch=batch)
    comps = manifest.components

    def measure(name: str, feed: dict[str, np.ndarray], where: str, per_call: int = 1) -> Timing:
        """Open ``name``, time it, release it: one session at a time."""
        session = _guard_memory(f"{name}{where}", ComponentSession.open, bundle_dir, name, comps[name], dev)
        try:
            return _guard_memory(f"{name}{where}", _time_runs, session, feed, repeat, per_call)
        finally:
            session.close()
            del session

    text_time = None
    if "text_encoder" in comps:
        feed = synthetic_feed(comps["text_encoder"], {"batch": batch, "text_length": text_length})
        text_time = measure("text_encoder", feed, "")
    factor = int(model.get("vae_scale_factor", 8))
    for h, w in sizes:
        _reset_peak_rss()
        result = SizeProfile(h, w)
        where = f" at {h}x{w}"
        dims = {"batch": batch, "height": h // factor, "width": w // factor, "text_length": text_length}
        feed = _guard_memory(f"transformer{where}", synthetic_feed, comps["transformer"], dims)
        result.components["transformer_step"] = measure("transformer", feed, where, per_call=steps)
        if ops:
            result.op_stats = _guard_memory(f"transformer{where} (--ops)", _op_stats, bundle_dir, manifest, dev,
                                            feed, repeat)
            result.op_groups = {g: st["seconds"] for g, st in result.op_stats["groups"].items()}
        del feed
        if "vae_decoder" in comps:
            vae_feed = synthetic_feed(comps["vae_decoder"], {**dims, "batch": 1})
            result.components["vae_decode"] = measure("vae_decoder", vae_feed, where)
        if text_time is not None:
            result.components["text_encoder"] = text_time
        result.end_to_end = profile.steps * result.components["transformer_step"].median + sum(
            t.median for k, t in result.components.items() if k != "transformer_step")
        result.peak_rss_mb = _peak_rss_mb()
        profile.sizes.append(result)
    return profile
