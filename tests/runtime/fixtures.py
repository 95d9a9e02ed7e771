"""Tiny random-weight diffusers pipelines and the bundles exported from them.

This module is the only place runtime tests build bundles: a diffusers-style pipeline
directory (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) goes through
``litedge.export.export_bundle`` as a user's would.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_MAX_LENGTH = 24
_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_WORDS = ["a", "the", "cat", "dog", "red", "blue", "on", "in", "of", "photo", "fox", "snow"]


def tiny_tokenizer():
    """A T5 (Unigram) tokenizer with 3 specials, letters and a few words: 53 ids."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _LETTERS] + [("\u2581" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def tiny_vae(mid_attention: bool = True):
    """8x AutoencoderKL with 8 channels everywhere (cheap at 2048 px without mid-block attention)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, mid_block_add_attention=mid_attention,
    ).eval()


def tiny_transformer(linear: bool):
    """tiny PixArt-Sigma (softmax teacher) or its LiT student (linear attention), random weights."""
    from litedge.models.configs import build_model

    model = build_model("tiny-LiT-T2I-XL", teacher=not linear, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # give zero-initialized tables values, so a skipped weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def scheduler_config() -> dict:
    """PixArt-Sigma's scheduler: DPM-Solver++ 2M on the linear beta schedule."""
    return {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
            "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "solver_order": 2,
            "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
            "timestep_spacing": "linspace", "steps_offset": 0, "variance_type": None}


def make_tiny_pixart_pipeline(out: Path, linear: bool = False, mid_attention: bool = True) -> Path:
    """Write a tiny diffusers PixArt-Sigma pipeline directory; returns ``out``."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from litedge.models.student import save_transformer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(tiny_transformer(linear), out / "transformer")
    tiny_vae(mid_attention).save_pretrained(out / "vae")
    tiny_t5().save_pretrained(out / "text_encoder")
    tiny_tokenizer().save_pretrained(out / "tokenizer")
    DPMSolverMultistepScheduler.from_config(scheduler_config()).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    return out


def make_tiny_dit_pipeline(out: Path) -> Path:
    """A class-conditional pipeline directory: tiny LiT-S/2 student (DiT) + tiny VAE + scheduler."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from litedge.models.configs import build_model
    from litedge.models.student import save_transformer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("tiny-LiT-S/2", seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_transformer(model, out / "transformer")
    tiny_vae().save_pretrained(out / "vae")
    config = {k: v for k, v in scheduler_config().items() if k != "_class_name"}
    DPMSolverMultistepScheduler(**config).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return out


def export(pipeline_dir: Path, out: Path, weights: str = "fp") -> Path:
    """``export_bundle`` for the cpu target; returns the bundle path."""
    from litedge.export.bundle_export import ExportConfig, export_bundle

    export_bundle(ExportConfig(out=Path(out), source=Path(pipeline_dir), target="cpu", weights=weights,
                               text_max_length=TEXT_MAX_LENGTH))
    return Path(out)


def diffusers_pipeline(pipeline_dir: Path):
    """The reference: diffusers' PixArtSigmaPipeline on the same directory (fp32, CPU)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    from litedge.models.loading import load_model

    d = Path(pipeline_dir)
    return PixArtSigmaPipeline(
        tokenizer=T5Tokenizer.from_pretrained(d / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(d / "text_encoder").eval(),
        vae=AutoencoderKL.from_pretrained(d / "vae").eval(),
        transformer=load_model(d).transformer.eval(),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(d / "scheduler"),
    )


# ----------------------------------------------------------------------------- SD3 / MM-EDiT

SD3_TEXT_MAX_LENGTH = 16  # T5 tokens (SD3: 256)
CLIP_MAX_LENGTH = 77


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level BPE CLIP tokenizer over letters and digits, no merges: every word is split into
    characters (the last with ``</w>``). ``pad_token`` "!" is CLIP-G's choice in SD3, the default CLIP-L's."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in _LETTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def tiny_clip(hidden: int, projection: int, seed: int):
    """A 3-layer CLIPTextModelWithProjection over :func:`tiny_clip_tokenizer`'s 75 ids."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=80, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                            num_attention_heads=2, projection_dim=projection, max_position_embeddings=CLIP_MAX_LENGTH,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_transformer(linear: bool):
    """tiny SD3.5-Medium-like MM-DiT (joint dim 32 = T5 width, pooled 24 = 8 + 16) or its MM-EDiT student."""
    from litedge.models.configs import build_model
    from litedge.models.linearize import linearize

    model = build_model("tiny-MM-EDiT-SD3.5-Medium", teacher=True, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialized layers (adaLN, proj_out) get values, so a skipped weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if linear:
        model, _ = linearize(model, "mmedit", seed=3)
    return model.eval()


def tiny_sd3_vae():
    """8x AutoencoderKL with 16 latent channels and SD3's scaling and shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def make_tiny_sd3_pipeline(out: Path, linear: bool = False, t5: bool = True) -> Path:
    """Write a tiny diffusers StableDiffusion3Pipeline directory (three text encoders); returns ``out``."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from litedge.models.student import save_transformer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(tiny_sd3_transformer(linear), out / "transformer")
    tiny_sd3_vae().save_pretrained(out / "vae")
    tiny_clip(8, 8, seed=5).save_pretrained(out / "text_encoder")  # CLIP-L: 8 + 16 = 24 <= T5's 32
    tiny_clip_tokenizer().save_pretrained(out / "tokenizer")
    tiny_clip(16, 16, seed=6).save_pretrained(out / "text_encoder_2")  # CLIP-G
    tiny_clip_tokenizer(pad_token="!").save_pretrained(out / "tokenizer_2")
    if t5:
        tiny_t5().save_pretrained(out / "text_encoder_3")
        tiny_tokenizer().save_pretrained(out / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
        "tokenizer_3": ["transformers", "T5Tokenizer"] if t5 else [None, None]}))
    return out


def export_sd3(pipeline_dir: Path, out: Path) -> Path:
    """``export_bundle`` of an SD3 pipeline for the cpu target (fp32 weights)."""
    from litedge.export.bundle_export import ExportConfig, export_bundle

    export_bundle(ExportConfig(out=Path(out), source=Path(pipeline_dir), target="cpu", weights="fp",
                               text_max_length=SD3_TEXT_MAX_LENGTH))
    return Path(out)


def diffusers_sd3_pipeline(pipeline_dir: Path):
    """The reference: diffusers' StableDiffusion3Pipeline on the same directory (fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    from litedge.models.loading import load_model

    d = Path(pipeline_dir)
    t5 = (d / "text_encoder_3").is_dir()
    return StableDiffusion3Pipeline(
        transformer=load_model(d).transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(d / "scheduler"),
        vae=AutoencoderKL.from_pretrained(d / "vae").eval(),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(d / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(d / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(d / "text_encoder_2").eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(d / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(d / "text_encoder_3").eval() if t5 else None,
        tokenizer_3=T5Tokenizer.from_pretrained(d / "tokenizer_3") if t5 else None,
    )
