"""A SANA-style deep-compression autoencoder (diffusers AutoencoderDC, f32) as a bundle's VAE.

One tiny pipeline (a LiT PixArt transformer on 16 latent channels at patch 1, a ResBlock-only
AutoencoderDC with 6 stages, the tiny T5) is exported for cpu once; the tests check the VAE
graph against diffusers' ``vae.decode``, the manifest, and generation through lit-generate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from litedge.errors import LitedgeError
from tests.cli import run_main

LATENT_CHANNELS = 16
SAMPLE_SIZE = 4  # latent pixels: the position grid's base, 128 px at f32
DECLARED_TRAINED = [128, 256]  # transformer/config.json "trained_sizes"
DECLARED_NATIVE = 256  # transformer/config.json "native_size" (as the demo: native above its base grid)


def tiny_dc_vae(block_types: str | tuple[str, ...] = "ResBlock"):
    """f32 AutoencoderDC: channels (8, 8, 16, 16, 32, 32), one layer per stage, 16 latent channels."""
    from diffusers import AutoencoderDC

    channels = (8, 8, 16, 16, 32, 32)
    attention = isinstance(block_types, tuple)
    scales = tuple(((5,) if b == "EfficientViTBlock" else ()) for b in block_types) if attention else ((),) * 6
    torch.manual_seed(3)
    return AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
        encoder_block_types=block_types, decoder_block_types=block_types,
        encoder_block_out_channels=channels, decoder_block_out_channels=channels,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales, scaling_factor=0.7,
    ).eval()


def make_dc_pipeline(out: Path, vae=None) -> Path:
    """A PixArt-Sigma pipeline directory whose VAE is :func:`tiny_dc_vae` and whose LiT transformer
    (patch 1, in_channels = the VAE's latent channels) declares ``trained_sizes`` and ``native_size``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from litedge.models.configs import _pixart_sigma
    from litedge.models.linearize import LinearizeConfig, linearize_
    from litedge.models.student import model_index_entry, save_transformer
    from tests.runtime.fixtures import scheduler_config, tiny_t5, tiny_tokenizer

    out.mkdir(parents=True)
    config = dict(_pixart_sigma(2, 4, 16, 32, SAMPLE_SIZE), in_channels=LATENT_CHANNELS,
                  out_channels=2 * LATENT_CHANNELS, patch_size=1, trained_sizes=DECLARED_TRAINED,
                  native_size=DECLARED_NATIVE)
    torch.manual_seed(1)
    model = PixArtTransformer2DModel.from_config(config)
    linearize_(model, LinearizeConfig(family="lit", heads=2))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialized layers get values, so a skipped weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_transformer(model.eval(), out / "transformer")
    (vae if vae is not None else tiny_dc_vae()).save_pretrained(out / "vae")
    tiny_t5().save_pretrained(out / "text_encoder")
    tiny_tokenizer().save_pretrained(out / "tokenizer")
    DPMSolverMultistepScheduler.from_config(scheduler_config()).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": model_index_entry(model),
        "vae": ["diffusers", "AutoencoderDC"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    return out


@pytest.fixture(scope="module")
def dc_pipeline(tmp_path_factory) -> Path:
    return make_dc_pipeline(tmp_path_factory.mktemp("dc") / "pipeline")


@pytest.fixture(scope="module")
def dc_bundle(dc_pipeline, tmp_path_factory) -> Path:
    """Its cpu bundle (int4 transformer, as lit-export's default; the VAE stays fp32)."""
    from litedge.export.bundle_export import ExportConfig, export_bundle
    from tests.runtime.fixtures import TEXT_MAX_LENGTH

    out = tmp_path_factory.mktemp("dc-bundle") / "dc.litedge"
    export_bundle(ExportConfig(out=out, source=dc_pipeline, target="cpu", text_max_length=TEXT_MAX_LENGTH))
    return out


def _torch_decode(vae, latents: np.ndarray) -> np.ndarray:
    """diffusers' reference: ``vae.decode(latent / scaling_factor).sample``, clamped as the graph does."""
    with torch.no_grad():
        z = torch.from_numpy(latents) / vae.config.scaling_factor
        return vae.decode(z).sample.clamp(-1, 1).numpy()


def test_vae_decoder_graph_matches_diffusers_decode(dc_pipeline, dc_bundle):
    import onnxruntime as ort
    from diffusers import AutoencoderDC

    vae = AutoencoderDC.from_pretrained(dc_pipeline / "vae").eval()
    session = ort.InferenceSession(str(dc_bundle / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    latents = np.random.default_rng(0).standard_normal((2, LATENT_CHANNELS, 5, 7), dtype=np.float32)  # not traced
    got = session.run(None, {"latent": latents})[0]
    want = _torch_decode(vae, latents)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"AutoencoderDC decode, ORT vs diffusers (2x16x5x7 -> 160x224 px): rel err {rel:.2e}")
    assert got.shape == (2, 3, 160, 224) and rel < 1e-4


def test_manifest_records_the_dc_vae_and_the_declared_trained_sizes(dc_bundle):
    manifest = json.loads((dc_bundle / "manifest.json").read_text())
    model, vae = manifest["model"], manifest["components"]["vae_decoder"]
    assert model["vae_scale_factor"] == 32 and model["latent_channels"] == LATENT_CHANNELS
    assert model["vae_scaling_factor"] == pytest.approx(0.7) and model["patch_size"] == 1
    assert model["trained_sizes"] == DECLARED_TRAINED and model["native_size"] == DECLARED_NATIVE  # as declared
    assert manifest["defaults"]["height"] == manifest["defaults"]["width"] == DECLARED_NATIVE
    assert vae["meta"]["vae_class"] == "AutoencoderDC" and vae["meta"]["vae_scale_factor"] == 32
    assert vae["meta"]["decoder_channels"] == [8, 8, 16, 16, 32, 32]
    assert vae["inputs"]["latent"]["shape"] == ["batch", LATENT_CHANNELS, "height", "width"]


def test_generation_decodes_the_final_latents_as_diffusers_does(dc_pipeline, dc_bundle):
    from diffusers import AutoencoderDC

    from litedge.runtime import Pipeline

    pipe = Pipeline.from_bundle(dc_bundle, device="cpu")
    assert pipe.vae_factor == 32 and (pipe.vae_tile, pipe.vae_overlap) == (128, 16)  # 8 full-res channels: 4096 px
    out = pipe("a red cat", height=96, width=160, steps=2, output_type="np", progress=False)
    assert out.images.shape == (1, 96, 160, 3) and out.latents.shape == (1, LATENT_CHANNELS, 3, 5)
    vae = AutoencoderDC.from_pretrained(dc_pipeline / "vae").eval()
    want = (_torch_decode(vae, out.latents) / 2 + 0.5).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out.images, want, atol=1e-4)


def _generate(argv, capsys):
    from litedge.cli.generate import main

    return run_main(main, argv, capsys)


def test_lit_generate_at_multiples_of_32_and_its_native_size(dc_bundle, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "wide.png"
    code, _, err = _generate(["a cat", "--bundle", dc_bundle, "--height", 192, "--width", 256, "--steps", 2,
                              "--quiet", "-o", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (256, 192) and "warning" not in err  # 192x256 is near 256x256
    code, _, err = _generate(["a cat", "--bundle", dc_bundle, "--steps", 1, "--quiet", "-o", tmp_path / "n.png"],
                             capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "n.png").size == (256, 256)  # no size: the declared native size
    code, _, err = _generate(["a cat", "--bundle", dc_bundle, "--size", 100, "--quiet", "-o", tmp_path / "x.png"],
                             capsys)
    assert code == 2 and err.count("\n") == 1 and "multiple of 32 (VAE factor 32 x patch size 1)" in err, err


def test_a_size_far_from_the_trained_ones_warns_in_one_line(dc_bundle, tmp_path, capsys):
    code, _, err = _generate(["a cat", "--bundle", dc_bundle, "--size", 640, "--steps", 1, "--quiet", "-o",
                              tmp_path / "big.png"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lit-generate: warning: 640x640 px is far from the sizes"), err
    assert "trained at (128, 256 px)" in lines[0] and "Traceback" not in err


# ----------------------------------------------------------------------------- refusals, before any export work


def _export_cli(argv, capsys):
    from litedge.cli.export import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _edited(pipeline: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(pipeline, tmp_path / "pipeline"))
    config = json.loads((copy / "vae" / "config.json").read_text())
    edit(config)
    (copy / "vae" / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(_class_name="AutoencoderTiny"), "names a AutoencoderTiny: litedge exports the VAE decoder "
     "of a diffusers AutoencoderKL or AutoencoderDC"),
    (lambda c: c.update(latent_channels=8), "the VAE has 8 latent channels but the transformer takes 16"),
])
def test_an_unsupported_or_mismatched_vae_is_one_line(edit, message, dc_pipeline, tmp_path, capsys):
    source = _edited(dc_pipeline, tmp_path, edit)
    code, err = _export_cli([source, "-o", tmp_path / "x.litedge"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.litedge").exists()


def test_trained_sizes_must_be_multiples_of_the_vae_factor(dc_pipeline, tmp_path, capsys):
    code, err = _export_cli([dc_pipeline, "--trained-sizes", "256,300", "-o", tmp_path / "x.litedge"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--trained-sizes 300: image sizes must be positive multiples " \
        "of 32" in err, err


def _loaded(**config):
    from diffusers.configuration_utils import FrozenDict

    return SimpleNamespace(transformer=SimpleNamespace(config=FrozenDict(config)))


def test_trained_sizes_flag_then_config_then_native():
    from litedge.export.bundle_export import ExportConfig, _trained_sizes

    loaded = _loaded(sample_size=32, patch_size=1, trained_sizes=[512, 256])
    flag = ExportConfig(out=Path("x.litedge"), config_name="tiny-LiT-T2I-XL", trained_sizes=(1024, 256, 512))
    assert _trained_sizes(flag, loaded, 32) == [256, 512, 1024]  # --trained-sizes wins, sorted
    plain = ExportConfig(out=Path("x.litedge"), config_name="tiny-LiT-T2I-XL")
    assert _trained_sizes(plain, loaded, 32) == [256, 512]  # the transformer config's
    assert _trained_sizes(plain, _loaded(sample_size=32, patch_size=1), 32) == [1024]  # native: 32 x 32
    with pytest.raises(LitedgeError, match="transformer/config.json trained_sizes"):
        _trained_sizes(plain, _loaded(sample_size=32, patch_size=1, trained_sizes="1024"), 32)


def test_native_size_flag_then_config_then_sample_size():
    from litedge.export.bundle_export import ExportConfig, _native_size

    flag = ExportConfig(out=Path("x.litedge"), config_name="tiny-LiT-T2I-XL", native_size=2048)
    plain = ExportConfig(out=Path("x.litedge"), config_name="tiny-LiT-T2I-XL")
    loaded = _loaded(sample_size=8, patch_size=1, native_size=1024)
    assert _native_size(flag, loaded, 32) == 2048 and _native_size(plain, loaded, 32) == 1024
    assert _native_size(plain, _loaded(sample_size=8, patch_size=1), 32) == 256
    with pytest.raises(LitedgeError, match="--native-size 1000: image sizes must be positive multiples of 32"):
        _native_size(ExportConfig(out=Path("x.litedge"), config_name="tiny-LiT-T2I-XL", native_size=1000), loaded, 32)
    # no --trained-sizes and none declared: the native size
    from litedge.export.bundle_export import _trained_sizes

    assert _trained_sizes(plain, loaded, 32) == [1024]


def test_the_export_flags_parse():
    from litedge.cli.export import build_parser

    args = build_parser().parse_args(["src", "-o", "x.litedge", "--trained-sizes", "256,512,1024",
                                      "--native-size", "1024"])
    assert args.trained_sizes == (256, 512, 1024) and args.native_size == 1024
