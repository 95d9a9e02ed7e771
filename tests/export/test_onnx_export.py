"""ONNX export of transformer / VAE decoder / text encoder: parity, dynamic shapes, rewrites.

Tiny seeded models; every export runs ONNX Runtime against PyTorch at two shapes itself
(raising past 1e-4), so the tests check the recorded figures and what the exporter must
not do (bake a size, leave a rank-6 tensor, change the user's model).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from transformers import T5Config, T5EncoderModel

from litedge.errors import LitedgeError
from litedge.export.onnx_export import export_text_encoder, export_transformer, export_vae_decoder
from litedge.export.onnx_io import cpu_session
from litedge.export.rewrites import dynamic_pos_embed, inference_mode_of
from litedge.export.specs import SampleSize, transformer_wrapper


def tiny_pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, caption_channels=32, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, norm_elementwise_affine=False,
        activation_fn="gelu-approximate", attention_bias=True,
    ).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(1)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(2)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()


TRANSFORMERS = {"pixart": tiny_pixart, "dit": tiny_dit, "sd3": tiny_sd3}


def max_rank(path) -> int:
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    return max(len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.output))


def run(path, wrapper, inputs) -> np.ndarray:
    names = wrapper.spec().input_names
    return cpu_session(path).run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_rank4_unpatchify_is_exact_vs_diffusers(kind):
    model = TRANSFORMERS[kind]()
    wrapper = transformer_wrapper(model)
    sizes = [SampleSize(2, 8, 8, 6), SampleSize(1, 12, 12, 3)]
    if kind != "dit":  # diffusers' DiT unpatchify assumes a square grid
        sizes.append(SampleSize(2, 6, 10, 4))
    for size in sizes:
        inputs = wrapper.sample_inputs(size)
        with inference_mode_of(wrapper):
            ours = wrapper(*inputs)
            reference = model(**wrapper.model_kwargs(*inputs))[0]
        assert torch.equal(ours, reference), f"{kind} at {size}"


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_export_transformer_matches_torch_at_two_shapes(kind, tmp_path):
    model = TRANSFORMERS[kind]()
    result = export_transformer(model, tmp_path / "transformer.onnx", sample_size=(8, 8))

    fid = result.fidelity
    assert fid["vs"] == "torch-fp32" and len(fid["checks"]) == 2
    assert fid["rel_err"] < 1e-5, fid  # measured ~2-3e-7
    sample_shapes = [c["input_shapes"]["sample"] for c in fid["checks"]]
    assert sample_shapes == [[1, 4, 8, 8], [2, 4, 8, 12]]  # export size, then batch 2 non-square
    assert result.files == [tmp_path / "transformer.onnx"]
    assert result.inputs["sample"] == {"dtype": "float32", "shape": ["batch", 4, "height", "width"]}
    assert result.inputs["timestep"] == {"dtype": "float32", "shape": ["batch"]}
    out_channels = model.out_channels
    assert result.outputs == {"noise_pred": {"dtype": "float32", "shape": ["batch", out_channels, "height", "width"]}}
    assert result.metadata["kind"] == kind and result.metadata["patch_size"] == 2
    assert max_rank(result.path) <= 4  # no rank-6 unpatchify left
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "DepthToSpace" in ops  # pixel_shuffle

    # a third size, taller than wide and with batch 3, never seen by the exporter
    wrapper = transformer_wrapper(model)
    inputs = wrapper.sample_inputs(SampleSize(3, 14, 6, 11), seed=7)
    with inference_mode_of(wrapper):
        ref = wrapper(*inputs).numpy()
    got = run(result.path, wrapper, inputs)
    assert got.shape == (3, out_channels, 14, 6)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_export_leaves_the_model_unchanged(tmp_path):
    model = tiny_pixart().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_transformer(model, tmp_path / "t.onnx")
    assert model.training and all(m.training for m in model.modules())
    assert (model.pos_embed.height, model.pos_embed.width) == (4, 4)
    assert not model.proj_out._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_pos_embed_is_computed_in_graph(tmp_path):
    """Exported at the config size, run at 2x: the sin-cos table must follow the input size."""
    model = tiny_pixart()
    result = export_transformer(model, tmp_path / "t.onnx", sample_size=(8, 8))
    wrapper = transformer_wrapper(model)
    inputs = wrapper.sample_inputs(SampleSize(1, 16, 16, 4), seed=3)
    with inference_mode_of(wrapper):
        ref = model(**wrapper.model_kwargs(*inputs))[0].numpy()  # diffusers recomputes the table at 16x16
    got = run(result.path, wrapper, inputs)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"Range", "Sin", "Cos"} <= ops


def test_without_the_rewrite_the_pos_table_is_baked(tmp_path):
    """What dynamic_pos_embed prevents: traced at the config size, the stored 4x4 table is a constant."""
    model = tiny_pixart()
    wrapper = transformer_wrapper(model)
    spec = wrapper.spec()
    path = tmp_path / "baked.onnx"
    with inference_mode_of(wrapper), pytest.warns(torch.jit.TracerWarning):
        torch.onnx.export(
            wrapper, wrapper.sample_inputs(SampleSize(2, 8, 8)), str(path), dynamo=False, opset_version=17,
            input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
        )
    with pytest.raises(Exception, match="(?i)broadcast|shape|dimension"):
        run(path, wrapper, wrapper.sample_inputs(SampleSize(1, 12, 12, 4)))
    # and the rewrite is what makes the difference
    with dynamic_pos_embed(model):
        assert (model.pos_embed.height, model.pos_embed.width) == (-1, -1)
    assert (model.pos_embed.height, model.pos_embed.width) == (4, 4)


def test_lit_student_exports_like_its_teacher(tmp_path):
    from litedge.models.linearize import linearize

    student, _ = linearize(tiny_pixart(), "lit", seed=0)
    result = export_transformer(student, tmp_path / "lit.onnx")
    assert result.fidelity["rel_err"] < 1e-5
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "Relu" in ops and "Softmax" in ops  # linear self-attention, softmax cross-attention


def test_parity_failure_raises(tmp_path):
    with pytest.raises(LitedgeError, match="differs from PyTorch"):
        export_transformer(tiny_dit(), tmp_path / "t.onnx", rtol=1e-15)


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(LitedgeError, match="expected one of"):
        export_transformer(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(LitedgeError, match="multiples of the patch size"):
        export_transformer(tiny_dit(), tmp_path / "x.onnx", sample_size=(7, 8))
    with pytest.raises(LitedgeError, match="model.float"):
        export_transformer(tiny_dit().half(), tmp_path / "x.onnx")
    with pytest.raises(LitedgeError, match="AutoencoderKL"):
        export_vae_decoder(tiny_dit(), tmp_path / "x.onnx")
    with pytest.raises(LitedgeError, match="T5EncoderModel"):
        export_text_encoder(tiny_vae(), tmp_path / "x.onnx")


def test_static_export_has_fixed_shapes(tmp_path):
    result = export_transformer(tiny_dit(), tmp_path / "s.onnx", dynamic=False, sample_size=(8, 8))
    assert result.inputs["sample"]["shape"] == [2, 4, 8, 8]
    assert result.manifest_entry()["shapes"] == "static"
    assert result.fidelity["rel_err"] < 1e-5


# ----------------------------------------------------------------------------- VAE decoder


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025,
    ).eval()


def test_export_vae_decoder(tmp_path):
    vae = tiny_vae()
    result = export_vae_decoder(vae, tmp_path / "vae_decoder.onnx", sample_size=(4, 4))
    assert result.fidelity["rel_err"] < 1e-5 and len(result.fidelity["checks"]) == 2
    assert result.inputs == {"latent": {"dtype": "float32", "shape": ["batch", 4, "height", "width"]}}
    assert result.outputs["image"]["shape"] == ["batch", 3, "image_height", "image_width"]
    meta = result.metadata
    assert meta["latent_scaling"] == "in-graph" and meta["scaling_factor"] == 0.13025
    assert meta["vae_scale_factor"] == 8 and meta["output_range"] == [-1.0, 1.0]

    # the convention: feed the loop's latent as is; the graph divides by scaling_factor
    latent = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(latent / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
    got = cpu_session(result.path).run(None, {"latent": latent.numpy()})[0]
    assert got.shape == (2, 3, 24, 40)
    assert np.abs(got - ref).max() < 1e-5 and got.min() >= -1 and got.max() <= 1
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props["litedge.component"] == "vae_decoder"
    assert json.loads(props["litedge.metadata"])["latent_scaling"] == "in-graph"


# ----------------------------------------------------------------------------- text encoder


def tiny_t5() -> T5EncoderModel:
    torch.manual_seed(4)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def test_export_text_encoder(tmp_path):
    result = export_text_encoder(tiny_t5(), tmp_path / "text_encoder.onnx", text_length=12)
    assert result.fidelity["rel_err"] < 1e-5
    assert [c["input_shapes"]["input_ids"] for c in result.fidelity["checks"]] == [[1, 12], [2, 7]]
    assert result.inputs == {
        "input_ids": {"dtype": "int64", "shape": ["batch", "text_length"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "text_length"]},
    }
    assert result.outputs == {"last_hidden_state": {"dtype": "float32", "shape": ["batch", "text_length", 32]}}


def test_external_data_is_one_file_and_reloads(tmp_path):
    path = tmp_path / "text_encoder.onnx"
    result = export_text_encoder(tiny_t5(), path, external_data=True)
    assert result.files == [path, tmp_path / "text_encoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert path.stat().st_size < result.files[1].stat().st_size
    assert result.fidelity["rel_err"] < 1e-5  # the parity check ran on the external-data model
    entry = result.manifest_entry(tmp_path)
    assert entry["file"] == "text_encoder.onnx" and entry["files"] == ["text_encoder.onnx", "text_encoder.onnx.data"]

    single = export_text_encoder(tiny_t5(), path)  # re-export as one file removes the stale .data
    assert single.files == [path] and not (tmp_path / "text_encoder.onnx.data").exists()
