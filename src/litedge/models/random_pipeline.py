"""Complete random-weight pipelines at the real sizes, laid out as real checkpoints are stored.

``build_random_pipeline("LiT-T2I-XL", out)`` writes a diffusers pipeline directory that
diffusers' and transformers' own ``from_pretrained`` read part by part and that
:func:`litedge.models.load_model` loads (the transformer is the config's litedge student)::

    out/model_index.json            PixArtSigmaPipeline / StableDiffusion3Pipeline / DiTPipeline
    out/transformer/                config.json + diffusion_pytorch_model[-0000k-of-0000N].safetensors
    out/text_encoder[_2,_3]/        T5-v1.1-XXL encoder; SD3: CLIP-L, CLIP-G, T5-XXL (model-0000k-of-...)
    out/tokenizer[_2,_3]/           synthetic T5 Unigram / CLIP BPE with the real vocab layouts
    out/vae/                        AutoencoderKL: SDXL-type (PixArt), 16-channel (SD3), SD (DiT)
    out/scheduler/                  DPM-Solver++ (PixArt), flow-match Euler shift 3 (SD3), DDIM (DiT)
    out/random_pipeline.json        how it was made: config, seed, dtype, a fingerprint per part

``tiny-`` configs get tiny widths (the test fixtures' sizes) but the real tokenizers.
Weights are streamed tensor by tensor (:mod:`litedge.models.random_weights`), in ``dtype``
(bf16 by default, as the checkpoints are published); the directory appears atomically.

Measured on the build machine (2 shared cores, 23 GiB, ``/usr/bin/time -v``), full size, bf16, seed 0:

| config | pipeline (written) | build time | peak RSS |
| --- | --- | --- | --- |
| LiT-T2I-XL (0.61 B transformer + 4.76 B T5-XXL + VAE) | 10.9 GB (10.9 GB) | 2 min 33 s | 0.52 GB |
| EDiT-PixArt-Sigma (T5-XXL hard-linked from the LiT build) | 11.1 GB (1.6 GB) | 41 s | 0.49 GB |
| MM-EDiT-SD3.5-Medium (2.46 B + CLIP-L + CLIP-G; T5-XXL linked) | 16.7 GB (7.2 GB) | 1 min 2 s | 3.9 GB |

SD3's 3.9 GB was diffusers building the transformer's (1, 147456, 1536) position table at construction
(0.9 GB in fp32, computed through float64), measured before that table was deferred
(``deferred_sincos_tables``): the meta construction now peaks at 0.37 GB; the full SD3 build has not
been re-measured since (its files are unchanged: the same values). CLI:
``python -m litedge.models.random_pipeline NAME OUT [--seed N] [--text-encoder-layers N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from litedge.atomic import atomic_directory
from litedge.errors import LitedgeError
from litedge.models import random_tokenizers as toks
from litedge.models.configs import ModelSpec, build_model, get_config
from litedge.models.random_weights import deferred_sincos_tables, meta_parameters, plan, write_weights

INIT_VERSION = 1  # bump when the init or the layout changes: parts of older builds are then not reused
PROVENANCE = "random_pipeline.json"
TEXT_MAX_LENGTH = {"pixart-sigma": 300, "sd3.5": 256}  # T5 tokens each pipeline reads

# The real text encoders' configs (T5-v1.1-XXL, CLIP ViT-L/14, OpenCLIP bigG/14 text towers).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dropout_rate=0.1, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
T5_TINY = {**T5_XXL, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
           "relative_attention_num_buckets": 8}
_CLIP = dict(vocab_size=toks.CLIP_VOCAB, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
             pad_token_id=1, layer_norm_eps=1e-5)
CLIP_L = {**_CLIP, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {**_CLIP, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
CLIP_L_TINY = {**CLIP_L, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
               "projection_dim": 8}
CLIP_G_TINY = {**CLIP_G, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
               "projection_dim": 16}
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            act_fn="silu", norm_num_groups=32, latent_channels=4, force_upcast=True)
_VAE_TINY = dict(_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
VAES = {  # base -> AutoencoderKL config (sample_size is set from the transformer's)
    "pixart-sigma": dict(scaling_factor=0.13025),  # SDXL-type VAE
    "sd3.5": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                  use_post_quant_conv=False),
    "dit": dict(scaling_factor=0.18215),  # stabilityai/sd-vae-ft-ema
}
SCHEDULERS = {
    "pixart-sigma": ("DPMSolverMultistepScheduler", dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        timestep_spacing="linspace", steps_offset=0, variance_type=None)),
    "sd3.5": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    "dit": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                  clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")),
}
PIPELINES = {"pixart-sigma": "PixArtSigmaPipeline", "sd3.5": "StableDiffusion3Pipeline", "dit": "DiTPipeline"}


@dataclass
class TextPart:
    """One text encoder and its tokenizer: folders, transformers class, config, tokenizer maker."""

    folder: str
    tokenizer_folder: str
    cls: str
    config: dict
    tokenizer_cls: str
    make_tokenizer: Callable[[Path], None] = field(repr=False)
    tokenizer_key: dict = field(default_factory=dict)  # what the tokenizer files depend on


def _t5_tokenizer_writer(max_length: int, seed: int) -> Callable[[Path], None]:
    return lambda folder: toks.save_t5_tokenizer(folder, max_length, seed=seed)


def _clip_tokenizer_writer(pad: str, seed: int) -> Callable[[Path], None]:
    return lambda folder: toks.save_clip_tokenizer(toks.clip_tokenizer(pad_token=pad, seed=seed), folder)


def text_parts(spec: ModelSpec, tiny: bool, seed: int, layers: int | None = None) -> list[TextPart]:
    """The text encoders of a config's base, in its pipeline's order; ``layers`` overrides each depth."""
    def depth(config: dict, key: str) -> dict:
        return config if layers is None else {**config, key: layers}

    t5 = depth(T5_TINY if tiny else T5_XXL, "num_layers")
    if spec.base == "dit":
        return []
    if spec.base == "pixart-sigma":
        return [TextPart("text_encoder", "tokenizer", "T5EncoderModel", t5, "T5Tokenizer",
                         _t5_tokenizer_writer(300, seed), {"kind": "t5", "max_length": 300, "seed": seed})]
    l_cfg, g_cfg = (CLIP_L_TINY, CLIP_G_TINY) if tiny else (CLIP_L, CLIP_G)
    eos = toks.CLIP_EOS
    return [
        TextPart("text_encoder", "tokenizer", "CLIPTextModelWithProjection", depth(l_cfg, "num_hidden_layers"),
                 "CLIPTokenizer", _clip_tokenizer_writer(eos, seed), {"kind": "clip", "pad": eos, "seed": seed}),
        TextPart("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", depth(g_cfg, "num_hidden_layers"),
                 "CLIPTokenizer", _clip_tokenizer_writer("!", seed), {"kind": "clip", "pad": "!", "seed": seed}),
        TextPart("text_encoder_3", "tokenizer_3", "T5EncoderModel", t5, "T5Tokenizer",
                 _t5_tokenizer_writer(256, seed), {"kind": "t5", "max_length": 256, "seed": seed}),
    ]


def _fingerprint(**what) -> str:
    blob = json.dumps({**what, "init": INIT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_text_encoder(folder: Path, part_cls: str, config: dict, *, seed: int, dtype: torch.dtype,
                       max_shard_bytes: int) -> None:
    """A transformers text encoder folder: ``config.json`` + ``model[-0000k-of-0000N].safetensors`` (+ index)."""
    import transformers

    cls = getattr(transformers, part_cls)
    config_cls = transformers.T5Config if part_cls.startswith("T5") else transformers.CLIPTextConfig
    cfg = config_cls(**config)
    with meta_parameters():
        model = cls(cfg)
    depth = config.get("num_layers", config.get("num_hidden_layers", 1))
    extra = {r"SelfAttention\.q\.weight$": config["d_kv"] ** -0.5} if part_cls.startswith("T5") else None
    entries = plan(model, dtype, depth, extra)
    del model
    folder.mkdir(parents=True, exist_ok=True)
    cfg.architectures = [part_cls]
    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    write_weights(folder, entries, weights_name="model.safetensors", index_name="model.safetensors.index.json",
                  seed=seed, role=part_cls, max_shard_bytes=max_shard_bytes)


def write_transformer(folder: Path, spec: ModelSpec, *, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> str:
    """The config's student as models/student.py saves students; returns its class name."""
    from litedge.models.student import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, model_config

    tables: list = []
    with meta_parameters(), deferred_sincos_tables(tables):
        model = build_model(spec.name, seed=seed)
    entries = plan(model, dtype, int(model.config.num_layers), tables=tables)
    config = model_config(model)
    del model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=list))
    write_weights(folder, entries, weights_name=WEIGHTS_NAME, index_name=WEIGHTS_INDEX_NAME, seed=seed,
                  role="transformer", max_shard_bytes=max_shard_bytes)
    return config["_class_name"]


def vae_config(spec: ModelSpec, tiny: bool) -> dict:
    """The AutoencoderKL config of a config's base; sample_size in pixels from the transformer's latents."""
    return {**(_VAE_TINY if tiny else _VAE), **VAES[spec.base], "sample_size": 8 * int(spec.teacher_config["sample_size"])}


def write_vae(folder: Path, config: dict, *, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> None:
    from diffusers import AutoencoderKL

    from litedge.models.student import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    with meta_parameters():
        vae = AutoencoderKL(**config)
    entries = plan(vae, dtype, depth=8)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_config(folder)
    del vae
    write_weights(folder, entries, weights_name=WEIGHTS_NAME, index_name=WEIGHTS_INDEX_NAME, seed=seed,
                  role="AutoencoderKL", max_shard_bytes=max_shard_bytes)


def _write_scheduler(folder: Path, base: str) -> str:
    import diffusers

    name, config = SCHEDULERS[base]
    getattr(diffusers, name).from_config(config).save_pretrained(folder)
    return name


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (a copy where linking is impossible)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _link_tree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def _reusable(source: Path | None) -> dict[str, Path]:
    """fingerprint -> folder of an earlier build's parts (empty without one)."""
    if source is None:
        return {}
    record = Path(source) / PROVENANCE
    if not record.is_file():
        raise LitedgeError(f"{source}: no {PROVENANCE}, so it was not made by build_random_pipeline; "
                           "pass a folder it built, or drop reuse_text_encoders_from")
    parts = json.loads(record.read_text()).get("parts", {})
    return {fp: Path(source) / folder for folder, fp in parts.items() if (Path(source) / folder).is_dir()}


def build_random_pipeline(config_name: str, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          max_shard_bytes: int = 2 * 2**30, text_encoder_layers: int | None = None,
                          reuse_text_encoders_from: str | Path | None = None, force: bool = False) -> Path:
    """Write a complete random-weight pipeline directory of a named config; returns ``out``.

    Args:
        config_name: a name of :data:`litedge.models.configs.CONFIGS` (``tiny-`` ones get tiny parts).
        out: the pipeline directory; it appears only when complete.
        seed: every tensor's values follow from (seed, part, tensor name).
        dtype: storage dtype of every floating tensor (bf16, fp16 or fp32).
        max_shard_bytes: weights above it are split into shards with an index (2 GiB as published).
        text_encoder_layers: override the depth of every text encoder (tests: 2 layers at T5-XXL widths).
        reuse_text_encoders_from: an earlier build's directory: its identical text-encoder and tokenizer
            folders are hard-linked (copied where that fails) instead of written again.
        force: replace an existing ``out``.

    Memory stays near one 32 MB chunk plus the transformer's buffers (SD3's position table): peak
    RSS 0.52 GB for LiT-T2I-XL's full pipeline (10.9 GB written in 2.5 min); see the module docstring.

    Raises:
        LitedgeError: unknown config, ``out`` exists without ``force``, too little disk, bad arguments.
    """
    spec = get_config(config_name)
    out = Path(out)
    if out.exists() and not force:
        raise LitedgeError(f"{out} exists: pass force=True (--force) to overwrite it")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LitedgeError(f"dtype {dtype} is not a storage dtype: choose torch.bfloat16, torch.float16 or torch.float32")
    if text_encoder_layers is not None and text_encoder_layers < 1:
        raise LitedgeError(f"text_encoder_layers must be >= 1, got {text_encoder_layers}")
    if max_shard_bytes < 1:
        raise LitedgeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tiny = spec.name.startswith("tiny-")
    reuse = _reusable(Path(reuse_text_encoders_from) if reuse_text_encoders_from is not None else None)
    weights = dict(seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes)
    prints: dict[str, str] = {}
    index: dict = {"_class_name": PIPELINES[spec.base]}
    try:
        with atomic_directory(out) as tmp:
            index["transformer"] = [_library(cls := write_transformer(tmp / "transformer", spec, **weights)), cls]
            for part in text_parts(spec, tiny, seed, text_encoder_layers):
                fp = _fingerprint(cls=part.cls, config=part.config, seed=seed, dtype=_dtype_name(dtype),
                                  shard=max_shard_bytes)
                if fp in reuse:
                    _link_tree(reuse[fp], tmp / part.folder)
                else:
                    write_text_encoder(tmp / part.folder, part.cls, part.config, **weights)
                tfp = _fingerprint(**part.tokenizer_key)
                if tfp in reuse:
                    _link_tree(reuse[tfp], tmp / part.tokenizer_folder)
                else:
                    part.make_tokenizer(tmp / part.tokenizer_folder)
                prints[part.folder], prints[part.tokenizer_folder] = fp, tfp
                index[part.folder] = ["transformers", part.cls]
                index[part.tokenizer_folder] = ["transformers", part.tokenizer_cls]
            write_vae(tmp / "vae", vae_config(spec, tiny), **weights)
            index["vae"] = ["diffusers", "AutoencoderKL"]
            index["scheduler"] = ["diffusers", _write_scheduler(tmp / "scheduler", spec.base)]
            (tmp / "model_index.json").write_text(json.dumps(_with_version(index), indent=2) + "\n")
            record = {"config": spec.name, "seed": seed, "dtype": _dtype_name(dtype), "init": INIT_VERSION,
                      "text_encoder_layers": text_encoder_layers, "parts": prints}
            (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise LitedgeError(f"{out}: writing the pipeline failed ({exc.strerror or exc}); nothing was left behind: "
                           "free disk space or choose another output folder") from None
    return out


def _library(class_name: str) -> str:
    import diffusers

    return "diffusers" if hasattr(diffusers, class_name) else "litedge"


def _with_version(index: dict) -> dict:
    import diffusers

    return {"_class_name": index.pop("_class_name"), "_diffusers_version": diffusers.__version__, **index}


def parameter_count(config_name: str, *, transformer: bool = True) -> dict[str, int]:
    """Parameters per part of a config's pipeline, counted on the meta device (no weights in memory)."""
    import transformers
    from diffusers import AutoencoderKL

    spec = get_config(config_name)
    tiny = spec.name.startswith("tiny-")
    counts = {}
    with meta_parameters(), deferred_sincos_tables([]):
        if transformer:
            counts["transformer"] = _count(build_model(spec.name))
        for part in text_parts(spec, tiny, 0):
            config_cls = transformers.T5Config if part.cls.startswith("T5") else transformers.CLIPTextConfig
            counts[part.folder] = _count(getattr(transformers, part.cls)(config_cls(**part.config)))
        counts["vae"] = _count(AutoencoderKL(**vae_config(spec, tiny)))
    return counts


def _count(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m litedge.models.random_pipeline",
                                description="Write a complete random-weight pipeline directory of a named config.")
    p.add_argument("name", help="a named config, e.g. LiT-T2I-XL, MM-EDiT-SD3.5-Medium, tiny-LiT-T2I-XL")
    p.add_argument("out", type=Path, help="the pipeline directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="storage dtype (default bf16)")
    p.add_argument("--text-encoder-layers", type=int, default=None, help="override every text encoder's depth")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="shard weights above this many GiB (default 2)")
    p.add_argument("--reuse-text-encoders-from", type=Path, default=None,
                   help="an earlier build whose identical text encoders and tokenizers are hard-linked")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        path = build_random_pipeline(args.name, args.out, seed=args.seed, dtype=dtype,
                                     max_shard_bytes=int(args.max_shard_gb * 2**30),
                                     text_encoder_layers=args.text_encoder_layers,
                                     reuse_text_encoders_from=args.reuse_text_encoders_from, force=args.force)
    except LitedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
