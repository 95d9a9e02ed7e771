"""One ONNX Runtime session per bundle component, with inputs checked against the manifest.

The manifest says each input's dtype and shape (an int dimension is fixed, a string one
symbolic and shared by every tensor that names it); :meth:`ComponentSession.run` refuses
anything else with one line that names the component, the input, what was expected and
what came (STYLE habit 9)::

    session = ComponentSession.open(bundle_dir, "transformer", manifest.components["transformer"], device)
    noise_pred = session.run(sample=x, timestep=t, encoder_hidden_states=e, encoder_attention_mask=m)

Static-shape bundles (directml, snapdragon) hold one graph per image-size bucket
(``meta["buckets"] = {"HxW": file}``, per-bucket input specs in ``meta["bucket_meta"]``);
``open(..., bucket="512x512")`` loads that one. A graph with a fixed batch (every input's
first dimension an int) takes any number of rows: :meth:`run` feeds it in chunks of that
batch, the last chunk padded by repeating its last row, and returns only the real rows.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from litedge.bundle import Component, resolve_path
from litedge.errors import LitedgeError
from litedge.runtime.devices import Device
from litedge.runtime.interface import check_graph_inputs


def _on_plugin(device: Device, component: Component) -> bool:
    """Whether ``component`` runs on ``device``'s plug-in EP: not when the manifest pins it to
    other providers (a snapdragon bundle's CPU text encoder and VAE beside its HTP transformer)."""
    pinned = component.meta.get("providers")
    return device.plugin_package is not None and not (pinned and device.provider not in pinned)


def _plugin_options(component: Component) -> dict[str, str]:
    """Provider options a compiled graph records (QNN's ``meta["qnn"]``: HTP backend, SoC)."""
    qnn = component.meta.get("qnn") or {}
    keys = {"backend": "backend_type", "soc_model": "soc_model", "htp_arch": "htp_arch",
            "offload_graph_io_quantization": "offload_graph_io_quantization"}
    return {option: str(qnn[key]) for key, option in keys.items() if key in qnn}


def cpu_threads() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), at least 1.

    ``LITEDGE_THREADS`` overrides it (a benchmark sharing the machine, a user leaving cores free).
    """
    env = os.environ.get("LITEDGE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise LitedgeError(f"LITEDGE_THREADS={env!r}: expected a thread count like 4") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(device: Device, low_memory: bool = False, component: Component | None = None, *,
                    profile_prefix: str | None = None, optimized_path: Path | None = None) -> ort.SessionOptions:
    """The ``ort.SessionOptions`` every litedge session runs with, each set on purpose.

    - Threads: ``intra_op_num_threads`` = :func:`cpu_threads`. onnxruntime's default counts
      the *host's* physical cores, which in a container or under ``taskset`` oversubscribes
      the cores this process really has (threads then wait on each other at every op: a
      step's cost stops being linear in its work). ``inter_op_num_threads`` 1 with the
      sequential executor: a transformer is a chain of large ops, each already parallel
      inside; a second pool would only compete for the same cores. ``LITEDGE_ORT_SPIN=0``
      stops idle workers spinning (for benchmarks sharing the cores with another runtime).
    - Graph optimizations: ``ORT_ENABLE_ALL`` (constant folding, the built-in fusions, and on
      CPU the NCHWc layout for convolutions). The per-machine result can be cached:
      ``optimized_path`` (see :func:`optimized_graph_path`) makes onnxruntime write the
      optimized graph there, which a later session loads with optimizations off, saving
      the optimization time at start (not per step).
    - Memory: the CPU arena and memory patterns stay on (after the warm-up a step allocates
      nothing: no page faults, no ``malloc`` of GB-sized activations per op). ``low_memory``
      turns both off so memory goes back to the OS after each run.
    - ``profile_prefix``: onnxruntime's profiler on, traces written with that prefix
      (``lit-profile --ops``).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if os.environ.get("LITEDGE_ORT_SPIN", "").strip() == "0":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        options.enable_cpu_mem_arena = False  # give memory back after each run
        options.enable_mem_pattern = False
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        # a >2 GB graph cannot be one protobuf: its weights go to a file beside it
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized_path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if device.plugin_package is not None and (component is None or _on_plugin(device, component)):
        # a plug-in EP is added per device, not by name
        ep_devices = [d for d in ort.get_ep_devices() if d.ep_name == device.provider]
        options.add_provider_for_devices(ep_devices, _plugin_options(component) if component is not None else {})
    return options


_session_options = session_options  # the name bench/int4.py patches

# Execution providers whose sessions run through IO binding, and onnxruntime's name of their device.
IO_BINDING_PROVIDERS = frozenset({"CUDAExecutionProvider"})
ORT_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
# Providers that run the CUDA-only fused ops (GroupNorm, NhwcConv) of a cuda bundle's main graph.
CUDA_ONLY_OPS_PROVIDERS = frozenset({"CUDAExecutionProvider"})


def optimized_graph_path(component: Component, device: Device, cache_dir: str | Path | None = None) -> Path | None:
    """Where the optimized graph of ``component`` on ``device`` is cached, or None (no cache).

    The cache is opt-in: ``cache_dir`` or ``LITEDGE_ORT_CACHE``. The key is the component's
    sha256 (from the verified manifest), the device, the CPU model and onnxruntime's version,
    because an ``ORT_ENABLE_ALL`` graph is specific to the machine it was optimized on.
    Plug-in EPs (QNN) compile their own context and are not cached here.
    """
    root = cache_dir if cache_dir is not None else os.environ.get("LITEDGE_ORT_CACHE", "").strip() or None
    if root is None or device.plugin_package is not None or not component.sha256:
        return None
    files = "|".join([component.sha256, *(str(e.get("sha256", "")) for e in component.extra_files)])
    key = hashlib.sha256(f"{files}|{device.provider}|{_cpu_model()}|{ort.__version__}".encode()).hexdigest()
    return Path(root) / f"{key[:32]}.onnx"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ComponentSession:
    """An ``ort.InferenceSession`` for one component; ``run_seconds`` sums time inside ORT."""

    def __init__(self, name: str, component: Component, session: ort.InferenceSession,
                 bucket: str | None = None, *, io_binding: bool = False, device: Device | None = None) -> None:
        self.io_binding = io_binding
        self._ort_device = ORT_DEVICE.get(device.provider, "cpu") if device is not None else "cpu"
        self._bound: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}  # input -> (array, its device copy)
        self.uploads = 0  # host -> device input copies made (IO binding)
        self.name = name
        self.component = component
        self.session = session
        self.bucket = bucket
        bucket_meta = ((component.meta.get("bucket_meta") or {}).get(bucket) or {}) if bucket else {}
        self.inputs: dict[str, dict] = bucket_meta.get("inputs") or component.inputs  # this graph's specs
        self.output_names = [o.name for o in session.get_outputs()]
        self.batch = fixed_batch(self.inputs)
        self.run_seconds = 0.0
        self.runs = 0

    @classmethod
    def open(cls, bundle_dir: str | Path, name: str, component: Component, device: Device,
             low_memory: bool = False, bucket: str | None = None, *, io_binding: bool | None = None,
             cache_dir: str | Path | None = None) -> ComponentSession:
        """Load ``component`` of the bundle at ``bundle_dir`` on ``device``; ``bucket`` ("HxW")
        picks the graph of a static-shape component (``meta["buckets"]``).

        ``io_binding``: run through onnxruntime's IO binding (None: when the EP is in
        :data:`IO_BINDING_PROVIDERS`, i.e. CUDA). ``cache_dir``: the optimized-graph cache
        (:func:`optimized_graph_path`; default ``LITEDGE_ORT_CACHE``, else none).

        Raises:
            LitedgeError: the file is not a model onnxruntime can load on that device, or
                the component has no graph for ``bucket``.
        """
        file = component.file
        if component.meta.get("cpu_graph") and device.provider not in CUDA_ONLY_OPS_PROVIDERS:
            # a cuda VAE's fused graph holds ops only the CUDA EP has; its portable twin runs elsewhere
            file = component.meta["cpu_graph"]
        if bucket is not None:
            buckets = component.meta.get("buckets") or {}
            if bucket not in buckets:
                raise LitedgeError(f"{name}: this bundle was exported for {', '.join(buckets) or 'no sizes'}, "
                                   f"not {bucket}: use one of those sizes or re-export with --sizes")
            file = buckets[bucket]
        path = resolve_path(bundle_dir, file)
        cached = optimized_graph_path(component, device, cache_dir) if bucket is None else None
        if cached is not None and cached.is_file():  # optimized on this machine before: load as is
            options = session_options(device, low_memory, component)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            path = cached
        else:
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
            options = session_options(device, low_memory, component, optimized_path=cached)
        if device.plugin_package is None:
            providers = device.providers
        else:
            providers = None if _on_plugin(device, component) else list(component.meta["providers"])
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001  ORT raises its own types; the file is what the user gave
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LitedgeError(f"{name}: onnxruntime cannot load {path.name} on {device.name} ({first}); "
                               "re-export the bundle, or try --device cpu") from None
        check_graph_inputs(name, path.name, (((component.meta.get("bucket_meta") or {}).get(bucket) or {}).get("inputs")
                                             if bucket else None) or component.inputs, session)  # issue 17
        bind = device.provider in IO_BINDING_PROVIDERS if io_binding is None else io_binding
        return cls(name, component, session, bucket, io_binding=bind, device=device)

    def dtype(self, input_name: str) -> np.dtype:
        """The numpy dtype the manifest declares for an input."""
        return np.dtype(self.inputs[input_name]["dtype"])

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise LitedgeError unless ``feeds`` match the manifest's input names, dtypes and shapes."""
        specs = self.inputs
        if not specs:
            return  # an old bundle without input specs: ORT checks what it can
        missing, extra = sorted(set(specs) - set(feeds)), sorted(set(feeds) - set(specs))
        if missing or extra:
            raise LitedgeError(f"{self.name}: inputs {sorted(feeds)} do not match the bundle's {sorted(specs)} "
                               f"(missing {missing}, unexpected {extra}); is this bundle for another model kind?")
        bound: dict[str, tuple[int, str]] = {}
        for input_name, spec in specs.items():
            value = feeds[input_name]
            want_dtype, want_shape = spec["dtype"], spec["shape"]
            where = f"{self.name} input '{input_name}'"
            if not isinstance(value, np.ndarray) or value.dtype != np.dtype(want_dtype) or value.ndim != len(want_shape):
                got = (f"{value.dtype} of shape {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise LitedgeError(f"{where}: expected {want_dtype} of rank {len(want_shape)} {_show(want_shape)}, "
                                   f"got {got}; pass np.asarray(x, dtype=np.{want_dtype}) of that shape")
            for axis, (dim, size) in enumerate(zip(want_shape, value.shape)):
                if isinstance(dim, int) and dim != size:
                    raise LitedgeError(f"{where}: expected {_show(want_shape)}, got shape {value.shape} "
                                       f"(axis {axis} must be {dim})")
                if isinstance(dim, str):
                    first = bound.setdefault(dim, (size, input_name))
                    if first[0] != size:
                        raise LitedgeError(f"{where}: dimension '{dim}' is {size} but input '{first[1]}' has "
                                           f"{first[0]}; every input must agree on '{dim}'")

    def run(self, **feeds: np.ndarray) -> np.ndarray:
        """Run with named inputs (checked first); returns the first output."""
        return self._run(self.output_names[:1], feeds)[0]

    def run_all(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run with named inputs (checked first); returns every output by name."""
        return dict(zip(self.output_names, self._run(self.output_names, feeds)))

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = {v.shape[0] for v in feeds.values() if isinstance(v, np.ndarray) and v.ndim}
        if self.batch is not None and len(rows) == 1 and rows != {self.batch}:
            return self._run_chunked(names, feeds, rows.pop())
        return self._run_once(names, feeds)

    def _run_chunked(self, names: list[str], feeds: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        """``n`` rows through a graph of fixed batch B: chunks of B rows, the last padded by
        repeating its last row; outputs (row-major) cut back to ``n`` rows."""
        B, outs = self.batch, []
        for start in range(0, n, B):
            chunk = {}
            for key, value in feeds.items():
                part = value[start:start + B]
                if len(part) < B:
                    part = np.concatenate([part, np.repeat(part[-1:], B - len(part), axis=0)])
                chunk[key] = np.ascontiguousarray(part)
            outs.append(self._run_once(names, chunk))
        return [np.concatenate([o[i] for o in outs])[:n] for i in range(len(names))]

    def _run_once(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.check_inputs(feeds)
        start = time.perf_counter()
        out = self._run_bound(names, feeds) if self.io_binding else self.session.run(names, feeds)
        self.run_seconds += time.perf_counter() - start
        self.runs += 1
        return out

    def _device_value(self, name: str, value: np.ndarray) -> ort.OrtValue:
        """``value`` on the EP's device; the same array object as last call is not copied again."""
        held = self._bound.get(name)
        if held is not None and held[0] is value:
            return held[1]
        device_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._ort_device, 0)
        self._bound[name] = (value, device_value)
        self.uploads += 1
        return device_value

    def _run_bound(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One run through IO binding: inputs on the device (the prompt embeddings and masks a
        denoising loop passes unchanged at every step are uploaded once), outputs allocated
        on the device by onnxruntime, then copied to the host for the numpy scheduler.

        An input array passed again as the same object is taken as unchanged: pass a new
        array, not one modified in place, when its values change.
        """
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, self._device_value(name, value))
        for name in names:
            binding.bind_output(name, self._ort_device, 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        """Release the session (its weights and arenas) and the inputs held on the device."""
        self._bound.clear()
        self.session = None  # type: ignore[assignment]


def fixed_batch(specs: dict[str, dict]) -> int | None:
    """The batch of a static graph: every input's first dimension the same int; else None (dynamic)."""
    firsts = {spec["shape"][0] if spec.get("shape") else None for spec in specs.values()}
    if len(firsts) == 1:
        first = firsts.pop()
        if isinstance(first, int) and not isinstance(first, bool):
            return first
    return None


def _show(shape: list) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
