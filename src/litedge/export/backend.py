"""The interface every target backend implements, and the ONNX one the cpu target uses.

``export_bundle`` loads the model once and hands each component to the target's backend
(STYLE habit 7): ``transformer``, ``vae_decoder`` and ``text_encoder`` (once per encoder) each write their
files into the bundle's temporary directory and register them with the writer. A new
target is a new subclass named in :data:`litedge.export.targets.TARGETS`; nothing else
changes.
"""

from __future__ import annotations

import abc
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from litedge.bundle import BundleWriter
from litedge.errors import LitedgeError
from litedge.export.targets import TargetProfile


log = logging.getLogger("litedge.export")


def stage(message: str) -> None:
    """Progress on long exports: which component, which stage (one INFO record on ``litedge.export``).

    lit-export shows it on stderr as ``lit-export: MESSAGE`` (hidden by ``-q``); a library
    caller sees it once it configures ``logging`` (e.g. ``logging.basicConfig(level="INFO")``).
    """
    log.info(message)


@dataclass
class ExportReport:
    """What was written: the bundle path, per-component fidelity and quantization figures."""

    path: Path
    fidelity: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BackendOptions:
    """The user's choices a backend needs (from :class:`litedge.export.bundle_export.ExportConfig`)."""

    weights: str  # "fp", "int4" or "int8"
    sizes: tuple[int, ...] = ()  # image sizes (px) of static-shape buckets
    keep_fp: tuple[str, ...] = ()  # layer patterns kept in full precision
    soc: str | None = None  # snapdragon SoC, e.g. "sm8650"
    hub_device: str | None = None  # Qualcomm AI Hub device name
    text_max_length: int | None = None  # prompt tokens of static-shape text graphs (None: the base model's)
    text_encoder_weights: str | None = None  # "fp", "int4", "int8" for the text encoders; None: as ``weights``
    vae_scale_factor: int = 8  # image px per latent px of the source's VAE (32 for a DC-AE): bucket latents


class Backend(abc.ABC):
    """Exports the components of one model for one target into a bundle being written.

    Components named in ``streams`` are handed over as skeletons (placeholder weights) with
    a ``weights=`` source to read one tensor at a time; the others get the whole model.
    """

    streams: frozenset[str] = frozenset()

    def __init__(self, target: TargetProfile, options: BackendOptions, report: ExportReport) -> None:
        self.target, self.options, self.report = target, options, report

    @abc.abstractmethod
    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        """Export the diffusion transformer (teacher or student) as component ``transformer``."""

    @abc.abstractmethod
    def vae_decoder(self, vae: nn.Module, writer: BundleWriter) -> None:
        """Export the decoder of an ``AutoencoderKL`` or ``AutoencoderDC`` as component ``vae_decoder``
        (latent -> image in [-1, 1], :class:`litedge.export.specs.VaeDecoderWrapper`)."""

    @abc.abstractmethod
    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder") -> None:
        """Export a text encoder (T5, or CLIP with projection: :func:`litedge.export.specs.text_encoder_wrapper`)
        as component ``name`` (SD3 has three: ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``)."""

    def finish(self, writer: BundleWriter) -> None:
        """Called after every component, before the manifest is written (e.g. compile, submit)."""


def load_backend(target: TargetProfile, options: BackendOptions, report: ExportReport) -> Backend:
    """Instantiate the target's backend from its ``module:Class`` path (imported only when used)."""
    module, _, name = target.backend.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise LitedgeError(
                f"target {target.name} needs the Python package {exc.name!r}: pip install 'litedge[{target.name}]'"
            ) from None
        raise LitedgeError(f"target {target.name} is not implemented in this litedge version: use --target cpu") from None
    return cls(target, options, report)
