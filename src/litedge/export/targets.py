"""Target profiles: what each device kind needs from an export (STYLE habit 7: one registry).

A profile fixes the artifact format, whether shapes are dynamic or bucketed, the activation
precision, the weight formats it accepts, and the execution providers the runtime should
ask for. ``lit-export --target NAME`` looks the name up here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from litedge.errors import LitedgeError

Weights = Literal["fp", "int4", "int8"]


@dataclass(frozen=True)
class TargetProfile:
    """One device kind.

    Attributes:
        name: the ``--target`` value.
        format: "onnx", "qnn" (ONNX QDQ compiled to QNN EPContext) or "coreml".
        shapes: "dynamic" latent height/width, or "static" buckets from ``--sizes``.
        precision: activation precision of the exported graphs.
        weights: accepted ``--weights`` values, the first being the default.
        providers: ONNX Runtime execution providers the runtime asks for, in order.
        backend: ``module:Class`` of its :class:`litedge.export.backend.Backend`.
        opset: ONNX opset of the legacy exporter for this target.
    """

    name: str
    format: Literal["onnx", "qnn", "coreml"]
    shapes: Literal["dynamic", "static"]
    precision: Literal["fp32", "fp16", "a16"]
    weights: tuple[Weights, ...]
    providers: tuple[str, ...]
    backend: str
    opset: int = 17

    def check_weights(self, weights: str | None) -> Weights:
        """The weights format to use: the default for None, LitedgeError if not supported."""
        if weights is None:
            return self.weights[0]
        if weights not in self.weights:
            raise LitedgeError(
                f"--weights {weights} is not available for target {self.name}: choose one of {', '.join(self.weights)}"
            )
        return weights  # type: ignore[return-value]


_EXPORT = "litedge.export"
TARGETS: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile("cpu", "onnx", "dynamic", "fp32", ("int4", "fp", "int8"), ("CPUExecutionProvider",),
                      f"{_EXPORT}.onnx_backend:OnnxBackend"),
        TargetProfile("cuda", "onnx", "dynamic", "fp16", ("int4", "fp"), ("CUDAExecutionProvider", "CPUExecutionProvider"),
                      f"{_EXPORT}.fp16_backend:CudaBackend"),
        TargetProfile("directml", "onnx", "static", "fp16", ("int4", "fp"), ("DmlExecutionProvider", "CPUExecutionProvider"),
                      f"{_EXPORT}.fp16_backend:DirectMLBackend"),
        TargetProfile("snapdragon", "qnn", "static", "a16", ("int4", "int8"), ("QNNExecutionProvider",),
                      f"{_EXPORT}.qnn_backend:QnnBackend"),
        TargetProfile("coreml", "coreml", "static", "fp16", ("int4", "fp"), (),
                      f"{_EXPORT}.coreml_backend:CoreMLBackend"),
    )
}


def get_target(name: str) -> TargetProfile:
    """The profile of a ``--target`` name; LitedgeError listing the known ones otherwise."""
    if name not in TARGETS:
        raise LitedgeError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
