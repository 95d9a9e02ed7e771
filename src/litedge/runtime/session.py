"""One ONNX Runtime session per bundle component, with inputs checked against the manifest.

The manifest says each input's dtype and shape (an int dimension is fixed, a string one
symbolic and shared by every tensor that names it); :meth:`ComponentSession.run` refuses
anything else with one line that names the component, the input, what was expected and
what came (STYLE habit 9)::

    session = ComponentSession.open(bundle_dir, "transformer", manifest.components["transformer"], device)
    noise_pred = session.run(sample=x, timestep=t, encoder_hidden_states=e, encoder_attention_mask=m)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from litedge.bundle import Component, resolve_path
from litedge.errors import LitedgeError
from litedge.runtime.devices import Device


def _session_options(device: Device, low_memory: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if low_memory:
        options.enable_cpu_mem_arena = False  # give memory back after each run
        options.enable_mem_pattern = False
    if device.plugin_package is not None:  # a plug-in EP is added per device, not by name
        ep_devices = [d for d in ort.get_ep_devices() if d.ep_name == device.provider]
        options.add_provider_for_devices(ep_devices, {})
    return options


class ComponentSession:
    """An ``ort.InferenceSession`` for one component; ``run_seconds`` sums time inside ORT."""

    def __init__(self, name: str, component: Component, session: ort.InferenceSession) -> None:
        self.name = name
        self.component = component
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]
        self.run_seconds = 0.0
        self.runs = 0

    @classmethod
    def open(cls, bundle_dir: str | Path, name: str, component: Component, device: Device,
             low_memory: bool = False) -> ComponentSession:
        """Load ``component`` of the bundle at ``bundle_dir`` on ``device``.

        Raises:
            LitedgeError: the file is not a model onnxruntime can load on that device.
        """
        path = resolve_path(bundle_dir, component.file)
        options = _session_options(device, low_memory)
        providers = None if device.plugin_package is not None else device.providers
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001  ORT raises its own types; the file is what the user gave
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LitedgeError(f"{name}: onnxruntime cannot load {path.name} on {device.name} ({first}); "
                               "re-export the bundle, or try --device cpu") from None
        return cls(name, component, session)

    def dtype(self, input_name: str) -> np.dtype:
        """The numpy dtype the manifest declares for an input."""
        return np.dtype(self.component.inputs[input_name]["dtype"])

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise LitedgeError unless ``feeds`` match the manifest's input names, dtypes and shapes."""
        specs = self.component.inputs
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
        self.check_inputs(feeds)
        start = time.perf_counter()
        out = self.session.run(names, feeds)
        self.run_seconds += time.perf_counter() - start
        self.runs += 1
        return out

    def close(self) -> None:
        """Release the session (its weights and arenas)."""
        self.session = None  # type: ignore[assignment]


def _show(shape: list) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
