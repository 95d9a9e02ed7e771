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

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from litedge.bundle import Component, resolve_path
from litedge.errors import LitedgeError
from litedge.runtime.devices import Device


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


def _session_options(device: Device, low_memory: bool, component: Component | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if low_memory:
        options.enable_cpu_mem_arena = False  # give memory back after each run
        options.enable_mem_pattern = False
    if device.plugin_package is not None and (component is None or _on_plugin(device, component)):
        # a plug-in EP is added per device, not by name
        ep_devices = [d for d in ort.get_ep_devices() if d.ep_name == device.provider]
        options.add_provider_for_devices(ep_devices, _plugin_options(component) if component is not None else {})
    return options


class ComponentSession:
    """An ``ort.InferenceSession`` for one component; ``run_seconds`` sums time inside ORT."""

    def __init__(self, name: str, component: Component, session: ort.InferenceSession,
                 bucket: str | None = None) -> None:
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
             low_memory: bool = False, bucket: str | None = None) -> ComponentSession:
        """Load ``component`` of the bundle at ``bundle_dir`` on ``device``; ``bucket`` ("HxW")
        picks the graph of a static-shape component (``meta["buckets"]``).

        Raises:
            LitedgeError: the file is not a model onnxruntime can load on that device, or
                the component has no graph for ``bucket``.
        """
        file = component.file
        if bucket is not None:
            buckets = component.meta.get("buckets") or {}
            if bucket not in buckets:
                raise LitedgeError(f"{name}: this bundle was exported for {', '.join(buckets) or 'no sizes'}, "
                                   f"not {bucket}: use one of those sizes or re-export with --sizes")
            file = buckets[bucket]
        path = resolve_path(bundle_dir, file)
        options = _session_options(device, low_memory, component)
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
        return cls(name, component, session, bucket)

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
        out = self.session.run(names, feeds)
        self.run_seconds += time.perf_counter() - start
        self.runs += 1
        return out

    def close(self) -> None:
        """Release the session (its weights and arenas)."""
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
