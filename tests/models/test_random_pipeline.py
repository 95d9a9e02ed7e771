"""build_random_pipeline(): complete random-weight pipelines that diffusers, transformers and litedge load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from litedge.errors import LitedgeError
from litedge.models.configs import CONFIGS
from litedge.models.loading import load_model
from litedge.models.random_pipeline import build_random_pipeline, main
from litedge.models.student import read_safetensors_weights

TINY = [name for name in CONFIGS if name.startswith("tiny-")]
PROMPT = "A photo of a red cat on the snow, highly detailed: 4k!"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every tiny config's pipeline, built once for the module."""
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build_random_pipeline(name, root / name.replace("/", "_")) for name in TINY}


def _inputs(loaded, height: int = 8, width: int = 8) -> dict:
    """Transformer inputs of the right kind (LoadedModel.kind) for a batch of 2."""
    g = torch.Generator().manual_seed(0)
    cfg = loaded.transformer.config
    kw = {"hidden_states": torch.randn(2, cfg.in_channels, height, width, generator=g), "timestep": torch.tensor([10, 700])}
    if loaded.kind == "dit":
        kw["class_labels"] = torch.tensor([3, 7])
    elif loaded.kind == "pixart":
        kw["encoder_hidden_states"] = torch.randn(2, 6, cfg.caption_channels, generator=g)
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        kw["encoder_hidden_states"] = torch.randn(2, 6, cfg.joint_attention_dim, generator=g)
        kw["pooled_projections"] = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    return kw


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_config_loads_as_its_student_with_a_finite_output(built, name):
    out = built[name]
    loaded = load_model(out)
    spec = CONFIGS[name]
    assert loaded.family == spec.family and loaded.pipeline_dir == out
    assert {"vae", "scheduler", "transformer"} <= {p.name for p in out.iterdir()}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == {"dit": "DiTPipeline", "pixart-sigma": "PixArtSigmaPipeline",
                                    "sd3.5": "StableDiffusion3Pipeline"}[spec.base]
    assert index["transformer"][1] == json.loads((out / "transformer/config.json").read_text())["_class_name"]
    stored = read_safetensors_weights(out / "transformer")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        y = loaded.transformer(**_inputs(loaded)).sample
    assert torch.isfinite(y).all() and 0.01 < y.std() < 100


def test_pixart_pipelines_run_in_diffusers(built):
    import litedge  # noqa: F401  (diffusers resolves the student class from sys.modules)
    from diffusers import PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    pipe = PixArtSigmaPipeline.from_pretrained(built["tiny-LiT-T2I-XL"])
    assert isinstance(pipe.text_encoder, T5EncoderModel) and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.tokenizer.model_max_length == 300 and len(pipe.tokenizer) == 32100
    assert type(AutoTokenizer.from_pretrained(built["tiny-LiT-T2I-XL"] / "tokenizer")).__name__ == "T5Tokenizer"
    pipe.to(torch.float32)
    image = pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 use_resolution_binning=False, clean_caption=False).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # EDiT's student is the same pipeline with another transformer class config.
    edit = PixArtSigmaPipeline.from_pretrained(built["tiny-EDiT-PixArt-Sigma"], text_encoder=pipe.text_encoder,
                                               vae=pipe.vae, tokenizer=pipe.tokenizer)
    assert edit.transformer.config.litedge["family"] == "edit"


def test_sd3_pipeline_runs_in_diffusers(built):
    import litedge  # noqa: F401
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(built["tiny-MM-EDiT-SD3.5-Medium"])
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.0609
    assert pipe.vae.config.use_quant_conv is False and pipe.scheduler.config.shift == 3.0
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert (pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, len(pipe.tokenizer)) == (49406, 49407, 49408)
    assert pipe.tokenizer_3.model_max_length == 256
    assert pipe.text_encoder.config.hidden_act == "quick_gelu" and pipe.text_encoder_2.config.hidden_act == "gelu"
    pipe.to(torch.float32)
    image = pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=32).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_dit_pipeline_runs_in_diffusers(built):
    import litedge  # noqa: F401
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(built["tiny-LiT-S/2"])
    assert pipe.vae.config.scaling_factor == 0.18215 and type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.to(torch.float32)
    image = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def _shard_keys(folder: Path, index_name: str) -> tuple[dict, dict[str, list[str]], int]:
    index = json.loads((folder / index_name).read_text())
    keys, nbytes = {}, 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as f:
            keys[shard] = list(f.keys())
            for k in f.keys():
                t = f.get_tensor(k)
                nbytes += t.numel() * t.element_size()
    return index, keys, nbytes


def test_sharding_writes_a_complete_index_and_the_same_weights(built, tmp_path):
    out = build_random_pipeline("tiny-LiT-T2I-XL", tmp_path / "sharded", max_shard_bytes=200_000)
    for folder, index_name in (("transformer", "diffusion_pytorch_model.safetensors.index.json"),
                               ("text_encoder", "model.safetensors.index.json")):
        index, keys, nbytes = _shard_keys(out / folder, index_name)
        assert len(keys) > 1 and index["metadata"]["total_size"] == nbytes
        listed = [k for shard_keys in keys.values() for k in shard_keys]
        assert sorted(listed) == sorted(index["weight_map"]) and len(set(listed)) == len(listed)
        assert all(index["weight_map"][k] == shard for shard, ks in keys.items() for k in ks)
        n = len(keys)
        assert sorted(keys) == [f"{index_name.split('.')[0]}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    # Each tensor's values follow from (seed, name): the shard layout does not change them.
    whole, sharded = load_model(built["tiny-LiT-T2I-XL"]).transformer, load_model(out).transformer
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), sharded.state_dict().values()))
    from transformers import T5EncoderModel

    a = T5EncoderModel.from_pretrained(built["tiny-LiT-T2I-XL"] / "text_encoder")
    b = T5EncoderModel.from_pretrained(out / "text_encoder")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tokenizers_round_trip_in_transformers_and_litedge_runtime(built):
    from transformers import AutoTokenizer

    from litedge.runtime.text import PromptTokenizer

    sd3 = built["tiny-MM-EDiT-SD3.5-Medium"]
    for out, folder, max_length in ((built["tiny-LiT-T2I-XL"], "tokenizer", 300), (sd3, "tokenizer_3", 256),
                                    (sd3, "tokenizer", 77), (sd3, "tokenizer_2", 77)):
        reference = AutoTokenizer.from_pretrained(out / folder)
        ids = reference(PROMPT).input_ids
        assert reference.model_max_length == max_length
        decoded = reference.decode(ids[1:-1] if max_length == 77 else ids[:-1])  # without bos / eos
        if max_length == 77:  # CLIP lower-cases and splits punctuation off words
            assert decoded.replace(" ", "") == PROMPT.lower().replace(" ", "")
        else:
            assert decoded == PROMPT
        assert reference.unk_token_id not in ids[1:-1] and len(ids) < 40
        runtime = PromptTokenizer.from_bundle(out, {"kind": "tokenizers", "path": folder}, max_length=max_length,
                                              lowercase=False)
        got, mask = runtime([PROMPT])
        assert got[0, : mask[0].sum()].tolist() == ids
    t5 = AutoTokenizer.from_pretrained(built["tiny-LiT-T2I-XL"] / "tokenizer")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]

def test_clip_vocab_and_merges_alone_give_the_same_tokens(built, tmp_path):
    """SD3's CLIP folders hold vocab.json + merges.txt too, as the published ones do."""
    import shutil

    from transformers import AutoTokenizer, CLIPTokenizer

    sd3 = built["tiny-MM-EDiT-SD3.5-Medium"]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(sd3 / "tokenizer_2" / name, tmp_path / name)
    clip_files = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(clip_files) == 49408 and clip_files.pad_token_id == 0
    assert clip_files(PROMPT).input_ids == AutoTokenizer.from_pretrained(sd3 / "tokenizer_2")(PROMPT).input_ids


def test_reuse_hard_links_identical_text_encoders(built, tmp_path):
    lit = built["tiny-LiT-T2I-XL"]
    edit = build_random_pipeline("tiny-EDiT-PixArt-Sigma", tmp_path / "edit", reuse_text_encoders_from=lit)
    sd3 = build_random_pipeline("tiny-MM-EDiT-SD3.5-Medium", tmp_path / "sd3", reuse_text_encoders_from=lit)

    def same_file(a: Path, b: Path) -> bool:
        return os.stat(a).st_ino == os.stat(b).st_ino

    assert same_file(edit / "text_encoder/model.safetensors", lit / "text_encoder/model.safetensors")
    assert same_file(edit / "tokenizer/tokenizer.json", lit / "tokenizer/tokenizer.json")
    assert same_file(sd3 / "text_encoder_3/model.safetensors", lit / "text_encoder/model.safetensors")
    assert not same_file(sd3 / "tokenizer_3/tokenizer.json", lit / "tokenizer/tokenizer.json")  # 256 vs 300 tokens
    assert not same_file(edit / "vae/diffusion_pytorch_model.safetensors", lit / "vae/diffusion_pytorch_model.safetensors")
    other_seed = build_random_pipeline("tiny-EDiT-PixArt-Sigma", tmp_path / "seed1", seed=1, reuse_text_encoders_from=lit)
    assert not same_file(other_seed / "text_encoder/model.safetensors", lit / "text_encoder/model.safetensors")


def test_cli_prints_the_path_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    out = tmp_path / "dit"
    assert main(["tiny-LiT-S/2", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "random_pipeline.json").read_text())["seed"] == 3
    for argv in (["tiny-LiT-S/2", str(out)], ["no-such-config", str(tmp_path / "x")],
                 ["tiny-LiT-T2I-XL", str(tmp_path / "y"), "--text-encoder-layers", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert main(["tiny-LiT-S/2", str(out), "--force"]) == 0


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    from litedge.models import random_pipeline

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(random_pipeline, "write_vae", full_disk)
    with pytest.raises(LitedgeError, match="No space left on device"):
        build_random_pipeline("tiny-LiT-T2I-XL", tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


_BUILD_AND_MEASURE = """
import json, sys, time, torch
from pathlib import Path
from litedge.models.random_pipeline import write_text_encoder
from transformers import T5EncoderModel  # imported before the baseline: the build's code, not its data

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
config = json.loads(sys.argv[2])
start = time.time()
write_text_encoder(Path(sys.argv[1]), "T5EncoderModel", config, seed=0, dtype=torch.bfloat16, max_shard_bytes=2**29)
print(json.dumps({"base": base, "peak": rss("VmHWM:"), "seconds": time.time() - start}))
"""


def _build_t5_in_subprocess(out: Path, config: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _BUILD_AND_MEASURE, str(out), json.dumps(config)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_a_text_encoder_takes_memory_independent_of_its_size(tmp_path):
    """A 0.22 GB (bf16) T5 is built within 160 MB above the interpreter's baseline (measured 74 MB: one chunk at a time)."""
    from litedge.models.random_pipeline import T5_XXL

    config = {**T5_XXL, "d_model": 1024, "d_ff": 2816, "d_kv": 64, "num_heads": 16, "num_layers": 6}
    figures = _build_t5_in_subprocess(tmp_path / "t5", config)
    written = sum(f.stat().st_size for f in (tmp_path / "t5").glob("*.safetensors"))
    assert written > 200e6
    assert figures["peak"] - figures["base"] < 160e6, figures


@pytest.mark.slow
def test_t5_xxl_widths_two_layers_is_finite_and_built_in_bounded_memory(tmp_path):
    """T5-XXL widths, 2 layers (1.03 GB bf16): peak RSS < 1 GB (measured 0.49 GB); std of the
    encoder output within 0.05..20 in bf16 and in fp32 (measured 1.00)."""
    from transformers import T5EncoderModel

    from litedge.models.random_pipeline import T5_XXL
    from litedge.models.random_tokenizers import t5_tokenizer

    figures = _build_t5_in_subprocess(tmp_path / "t5", {**T5_XXL, "num_layers": 2})
    assert figures["peak"] < 1e9, figures
    batch = t5_tokenizer(300)([PROMPT, "a dog"], padding="max_length", max_length=32, return_tensors="pt")
    model = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()
    assert model.dtype == torch.bfloat16 and model.config.d_model == 4096
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            h = model.to(dtype)(**batch).last_hidden_state.float()
            assert torch.isfinite(h).all() and 0.05 < h.std() < 20, (dtype, h.std())


@pytest.mark.slow
def test_full_size_lit_student_is_finite(tmp_path):
    """LiT-T2I-XL's transformer at its real size (bf16 on disk, fp32 in memory) on a 32x32 latent."""
    from litedge.models.configs import get_config
    from litedge.models.random_pipeline import write_transformer

    write_transformer(tmp_path / "transformer", get_config("LiT-T2I-XL"), seed=0, dtype=torch.bfloat16,
                      max_shard_bytes=2 * 2**30)
    loaded = load_model(tmp_path / "transformer")
    with torch.no_grad():
        y = loaded.transformer(**_inputs(loaded, 32, 32)).sample
    assert torch.isfinite(y).all() and 0.01 < y.std() < 100


def test_full_size_parts_have_the_published_sizes():
    """Counted on the meta device: T5-v1.1-XXL's encoder is 4.76 B parameters, CLIP-L's text tower 124 M,
    CLIP-G's 695 M, the SDXL / SD3 VAEs 84 M."""
    from litedge.models.random_pipeline import parameter_count

    pixart = parameter_count("LiT-T2I-XL", transformer=False)
    sd3 = parameter_count("MM-EDiT-SD3.5-Medium", transformer=False)
    assert abs(pixart["text_encoder"] - 4.762e9) < 0.005e9 and sd3["text_encoder_3"] == pixart["text_encoder"]
    assert abs(sd3["text_encoder"] - 123.7e6) < 1e6 and abs(sd3["text_encoder_2"] - 694.7e6) < 1e6
    assert abs(pixart["vae"] - 83.65e6) < 0.5e6 and abs(sd3["vae"] - 83.65e6) < 0.5e6


def test_sd3_position_table_is_diffusers_own_written_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """The (1, N, D) sincos table is not computed at construction (3-4 GB for SD3.5) but streamed in chunks."""
    from litedge.models import random_weights
    from litedge.models.configs import build_model, get_config
    from litedge.models.random_pipeline import write_transformer

    monkeypatch.setattr(random_weights, "CHUNK", 3 * 24 * 64)  # 3 of the 24 grid rows per chunk
    write_transformer(tmp_path / "t", get_config("tiny-MM-EDiT-SD3.5-Medium"), seed=0, dtype=torch.float32,
                      max_shard_bytes=2**30)
    written = read_safetensors_weights(tmp_path / "t")["pos_embed.pos_embed"]
    reference = build_model("tiny-MM-EDiT-SD3.5-Medium").pos_embed.pos_embed
    assert written.shape == reference.shape == (1, 576, 64) and torch.equal(written, reference)
