"""The ONNX backend of the cpu target: fp32 graphs with dynamic shapes, int4 / int8 MatMulNBits weights.

Every component is exported streamed (:mod:`litedge.export.streaming`): traced without its
weights, which are then written from the checkpoint one tensor at a time and quantized as
they are written, so a 19 GB T5-XXL exports in the memory of one layer plus the written
graph's check. The transformer and the text encoders take ``--weights`` (the text encoders
``--text-encoder-weights`` when given; their token tables int4 too); the VAE decoder stays
fp32 (convolutions: MatMulNBits does not apply).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from litedge.bundle import BundleWriter
from litedge.export.backend import Backend, stage
from litedge.export.graph_fusions import fuse_gelu_tanh
from litedge.export.onnx_export import ExportResult
from litedge.export.onnx_io import file_bytes
from litedge.export.rewrites import dynamic_pos_embed
from litedge.export.specs import SampleSize, VaeDecoderWrapper, text_encoder_wrapper, transformer_wrapper
from litedge.export.streaming import export_streamed
from litedge.export.weight_writer import WeightFormat
from litedge.models.weights import ModuleWeights, WeightSource

# Weights per scale: 32 for the transformer (its accuracy decides the image), 64 for text encoders
# (T5-XXL is 90% of a PixArt bundle: 64 keeps the LiT-T2I-XL bundle within 3.5 GB).
BLOCK_SIZES = {"transformer": 32, "text_encoder": 64}
TRACE_LATENT = 16  # latent size the transformer is traced and checked at (the graph is dynamic)


def weight_format(weights: str, *, block_size: int, keep_fp: tuple[str, ...] = (), embeddings: bool = False) -> WeightFormat:
    """``--weights`` value -> :class:`WeightFormat`."""
    bits = {"fp": None, "int4": 4, "int8": 8}[weights]
    return WeightFormat(bits=bits, block_size=block_size, embeddings=embeddings and bits is not None, exclude=keep_fp)


class OnnxBackend(Backend):
    """fp32 ONNX (legacy exporter, the target's opset), dynamic latent size, optional int4 / int8 weights."""

    streams = frozenset({"transformer", "vae_decoder", "text_encoder"})
    # Added to the VAE decoder's and text encoders' manifest meta (a subclass that compiles
    # only the transformer says here where the other components run).
    support_meta: dict = {}

    def transformer(self, model: nn.Module, writer: BundleWriter, weights: WeightSource | None = None) -> None:
        stage(f"transformer ({type(model).__name__}): export to ONNX, parity check")
        wrapper = transformer_wrapper(model)
        fmt = weight_format(self.options.weights, block_size=BLOCK_SIZES["transformer"], keep_fp=self.options.keep_fp)
        p = wrapper.patch_size
        side = max(TRACE_LATENT // p, 2) * p
        wide = side + 2 * p
        if wrapper.metadata().get("max_width") is not None and wide > wrapper.metadata()["max_width"]:
            wide = side - 2 * p
        result = export_streamed(
            "transformer", wrapper, weights or ModuleWeights(model), writer.path / "transformer.onnx",
            trace=SampleSize(2, side, side, 8), check_sizes=[SampleSize(1, side, side, 8), SampleSize(2, side, wide, 5)],
            opset=self.target.opset, fmt=fmt, rewrite=lambda: dynamic_pos_embed(model), graph_rewrite=fuse_gelu_tanh,
        )
        self._record("transformer", result, fmt)
        self._add(writer, "transformer", result, {"weights": self.options.weights, **result.metadata})

    def vae_decoder(self, vae: nn.Module, writer: BundleWriter, weights: WeightSource | None = None) -> None:
        stage("vae_decoder: export to ONNX, parity check (fp32: its convolutions stay full precision)")
        wrapper = VaeDecoderWrapper(vae)
        side = 16 if wrapper.scale_factor <= 8 else max(4, 128 // wrapper.scale_factor)  # latent px (f32: 128 px)
        result = export_streamed(
            "vae_decoder", wrapper, weights or ModuleWeights(vae), writer.path / "vae_decoder.onnx",
            trace=SampleSize(1, side, side), check_sizes=[SampleSize(1, side, side), SampleSize(2, side, side + side // 2)],
            opset=self.target.opset,
        )
        self._record("vae_decoder", result, WeightFormat())
        self._add(writer, "vae_decoder", result, {"weights": "fp", **result.metadata, **self.support_meta})

    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder",
                     weights: WeightSource | None = None) -> None:
        choice = self.options.text_encoder_weights or self.options.weights
        stage(f"{name} ({type(encoder).__name__}): export to ONNX ({choice} weights), parity check")
        fmt = weight_format(choice, block_size=BLOCK_SIZES["text_encoder"], embeddings=True)
        result = export_streamed(
            name, text_encoder_wrapper(encoder), weights or ModuleWeights(encoder), writer.path / f"{name}.onnx",
            trace=SampleSize(2, 1, 1, 16), check_sizes=[SampleSize(1, 1, 1, 16), SampleSize(2, 1, 1, 11)],
            opset=self.target.opset, fmt=fmt,
        )
        self._record(name, result, fmt)
        self._add(writer, name, result, {"weights": choice, **result.metadata, **self.support_meta})

    # ------------------------------------------------------------------ shared steps

    def _record(self, name: str, result: ExportResult, fmt: WeightFormat) -> None:
        """Fidelity into the report: the exact check as ``name``, the quantized one as ``name_int4``."""
        fidelity = dict(result.fidelity)
        quantized = fidelity.pop("quantized", None)
        self.report.fidelity[name] = fidelity
        if quantized is not None:
            suffix = fmt.label.split("-")[0]
            self.report.fidelity[f"{name}_{suffix}"] = quantized
            quant = result.metadata["quantization"]
            quant["size_after"] = file_bytes(result.path)
            self.report.quantization[name] = quant
            left = f"; {len(quant['left_fp32'])} fp32: {', '.join(quant['left_fp32'])}" if quant["left_fp32"] else ""
            table = "; token table int4" if quant["embeddings"] != "fp32" else ""
            stage(f"{name}: {quant['quantized']}/{quant['quantized'] + len(quant['left_fp32'])} linear layers {suffix} "
                  f"(block {fmt.block_size}, symmetric){left}{table}; {quant['size_after'] / 1e6:.1f} MB; "
                  f"rel_err {quantized['rel_err']:.3g} vs fp32")

    @staticmethod
    def _add(writer: BundleWriter, name: str, result: ExportResult, meta: dict) -> None:
        files = result.files
        writer.add_component(
            name, files[0].name, inputs=result.inputs, outputs=result.outputs, shapes="dynamic",
            extra_files=[Path(p).name for p in files[1:]], meta=meta,
        )
