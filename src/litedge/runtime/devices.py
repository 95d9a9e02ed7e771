"""Devices -> ONNX Runtime execution providers (STYLE habit 7: one registry, no if/elif).

``resolve_device("auto", manifest.target)`` picks the device the bundle was exported for
when this machine has it, and otherwise CPU, logging which one it chose. A device asked
for by name that is not available raises :class:`LitedgeError`; it never falls back
silently::

    device = resolve_device("cpu", manifest.target)
    session = ort.InferenceSession(path, sess_options=device.session_options(),
                                   providers=device.providers)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from litedge.errors import LitedgeError

log = logging.getLogger("litedge.runtime")


@dataclass(frozen=True)
class Device:
    """One kind of accelerator and how ONNX Runtime reaches it.

    Attributes:
        name: the ``--device`` value.
        provider: the execution provider that makes the device (first in ``providers``).
        fallback: providers after it, for the nodes it does not take (usually CPU).
        install: what to install when the provider is missing.
        plugin_package: a Python package shipping the provider as a plug-in library
            (``ort.register_execution_provider_library``) instead of inside onnxruntime.
    """

    name: str
    provider: str
    fallback: tuple[str, ...]
    install: str
    plugin_package: str | None = None

    @property
    def providers(self) -> list[str]:
        return [self.provider, *self.fallback]


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("cpu", "CPUExecutionProvider", (), "pip install onnxruntime"),
        Device("cuda", "CUDAExecutionProvider", ("CPUExecutionProvider",),
               "pip install onnxruntime-gpu (and a CUDA 12 runtime) instead of onnxruntime"),
        Device("directml", "DmlExecutionProvider", ("CPUExecutionProvider",),
               "pip install onnxruntime-directml (Windows) instead of onnxruntime"),
        Device("qnn", "QNNExecutionProvider", (), "pip install 'litedge[qnn]' (onnxruntime-qnn)",
               plugin_package="onnxruntime_qnn"),
        Device("coreml", "CoreMLExecutionProvider", ("CPUExecutionProvider",),
               "use macOS with the standard onnxruntime wheel"),
    )
}

# The device a bundle's target (manifest ``target.name``) was made for.
TARGET_DEVICE = {"cpu": "cpu", "cuda": "cuda", "directml": "directml", "snapdragon": "qnn", "coreml": "coreml"}


def _register_plugin(device: Device) -> bool:
    """Register a plug-in execution provider library if its package is installed."""
    if device.plugin_package is None or importlib.util.find_spec(device.plugin_package) is None:
        return False
    if device.provider in ort.get_available_providers():
        return True
    package = importlib.import_module(device.plugin_package)
    if hasattr(package, "get_library_path"):  # onnxruntime-qnn >= 2
        library = Path(package.get_library_path())
    else:
        found = sorted(Path(package.__file__).parent.glob("*onnxruntime_providers_*"))
        if not found:
            return False
        library = found[0]
    try:
        ort.register_execution_provider_library(device.provider, str(library))
    except Exception as e:  # noqa: BLE001  an ORT build without plug-in support, or a broken install
        log.warning("could not register %s from %s: %s", device.provider, library, e)
        return False
    return True


def is_available(name: str) -> bool:
    """True if this machine's onnxruntime can run on device ``name`` (a key of :data:`DEVICES`)."""
    device = _device(name)
    if device.provider in ort.get_available_providers():
        return True
    if device.plugin_package is not None and _register_plugin(device):
        return device.provider in ort.get_available_providers() or any(
            d.ep_name == device.provider for d in ort.get_ep_devices())
    return False


def _device(name: str) -> Device:
    if name not in DEVICES:
        raise LitedgeError(f"unknown device {name!r}: choose one of auto, {', '.join(DEVICES)}")
    return DEVICES[name]


def resolve_device(requested: str, target: dict) -> Device:
    """The device to run a bundle on.

    Args:
        requested: ``"auto"`` or a key of :data:`DEVICES`.
        target: the manifest's ``target`` section (``name``, ``format``, ``providers``).

    Raises:
        LitedgeError: an unknown or unavailable device, or a bundle format this runtime
            cannot run on the chosen device.
    """
    fmt = target.get("format", "onnx")
    if fmt == "coreml":
        raise LitedgeError("this bundle holds Core ML packages (target coreml); litedge's runtime runs ONNX "
                           "bundles: re-export with --target cpu (or cuda/directml), or run it with Core ML on macOS/iOS")
    wanted = TARGET_DEVICE.get(target.get("name", "cpu"), "cpu")
    if requested == "auto":
        if is_available(wanted):
            log.info("device auto: running on %s, the device this bundle was exported for", wanted)
            return DEVICES[wanted]
        if fmt == "qnn":
            raise LitedgeError(f"this bundle is compiled for the Snapdragon NPU (QNN) and needs the QNN execution "
                               f"provider, which is not installed: {DEVICES['qnn'].install}")
        log.warning("device auto: the bundle targets %s but %s is not available here; running on cpu "
                    "(%s to use it)", wanted, DEVICES[wanted].provider, DEVICES[wanted].install)
        return DEVICES["cpu"]
    device = _device(requested)
    if not is_available(requested):
        have = ", ".join(ort.get_available_providers())
        raise LitedgeError(f"device {requested!r} is not available: onnxruntime here has {have} but not "
                           f"{device.provider}; {device.install}, or use --device cpu")
    if fmt == "qnn" and requested != "qnn":
        raise LitedgeError(f"this bundle is compiled for the Snapdragon NPU (QNN); --device {requested} cannot run "
                           "it: use --device qnn, or re-export with --target cpu")
    return device
