"""The ONNX backend of the cpu target: fp32 graphs with dynamic shapes, int4 MatMulNBits weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from litedge.bundle import BundleWriter
from litedge.export.backend import Backend, stage
from litedge.export.onnx_export import ExportResult, export_text_encoder, export_transformer, export_vae_decoder
from litedge.export.onnx_io import model_files


class OnnxBackend(Backend):
    """fp32 ONNX (legacy exporter, the target's opset), dynamic latent size, optional int4 weights."""

    # Added to the VAE decoder's and text encoders' manifest meta (a subclass that compiles
    # only the transformer says here where the other components run).
    support_meta: dict = {}

    def transformer(self, model: nn.Module, writer: BundleWriter) -> None:
        stage(f"transformer ({type(model).__name__}): export to ONNX, parity check")
        quantize = self.options.weights == "int4"
        # An int4 export quantizes an fp32 intermediate; external data keeps the name it was written with.
        path = writer.path / ("transformer.fp32.onnx" if quantize else "transformer.onnx")
        result = export_transformer(model, path, opset=self.target.opset)
        self._fidelity("transformer", result)
        files, meta = result.files, {"weights": self.options.weights, **result.metadata}
        if quantize:
            files, meta["quantization"] = self._int4(result, writer.path / "transformer.onnx")
        self._add(writer, "transformer", result, files, meta)

    def vae_decoder(self, vae: nn.Module, writer: BundleWriter) -> None:
        stage("vae_decoder: export to ONNX, parity check")
        result = export_vae_decoder(vae, writer.path / "vae_decoder.onnx", opset=self.target.opset)
        self._fidelity("vae_decoder", result)
        self._add(writer, "vae_decoder", result, result.files, {**result.metadata, **self.support_meta})

    def text_encoder(self, encoder: nn.Module, writer: BundleWriter, name: str = "text_encoder") -> None:
        stage(f"{name} ({type(encoder).__name__}): export to ONNX, parity check")
        result = export_text_encoder(encoder, writer.path / f"{name}.onnx", opset=self.target.opset)
        self._fidelity(name, result)
        self._add(writer, name, result, result.files, {**result.metadata, **self.support_meta})

    # ------------------------------------------------------------------ shared steps

    def _fidelity(self, name: str, result: ExportResult) -> None:
        self.report.fidelity[name] = {**result.fidelity, "vs": "torch-fp32"}

    def _int4(self, result: ExportResult, out: Path) -> tuple[list[Path], dict]:
        """Quantize an exported fp32 graph to int4 weights; deletes the fp32 files."""
        from litedge.quantize.int4 import quantize_int4

        stage("transformer: 4-bit weights (MatMulNBits, block 32, symmetric)")
        quant = quantize_int4(result.path, out, exclude=self.options.keep_fp, check_inputs=result.sample_inputs)
        stage(f"transformer: {quant.summary()}")
        meta = {
            "block_size": quant.block_size, "symmetric": quant.symmetric, "quantized": len(quant.quantized),
            "left_fp32": quant.left_fp32, "size_before": quant.size_before, "size_after": quant.size_after,
        }
        self.report.quantization["transformer"] = meta
        self.report.fidelity["transformer_int4"] = quant.fidelity or {}
        for path in result.files:
            path.unlink()
        return model_files(quant.path), meta

    @staticmethod
    def _add(writer: BundleWriter, name: str, result: ExportResult, files: list[Path], meta: dict) -> None:
        writer.add_component(
            name, files[0].name, inputs=result.inputs, outputs=result.outputs, shapes="dynamic",
            extra_files=[p.name for p in files[1:]], meta=meta,
        )
