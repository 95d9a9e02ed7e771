"""What each exported component looks like from outside: names, dtypes, symbolic shapes.

One place per model kind (STYLE habit 6), shared by every export backend: a wrapper
``nn.Module`` with a fixed positional signature and a plain-tensor output, the
input/output specs written to the bundle manifest, and random sample inputs of any size.

Symbolic dimension names: ``batch``; ``height``/``width`` of the latent; ``image_height``/
``image_width`` of the decoded image (``vae_scale_factor`` x the latent's); ``text_length``.

Transformers (students are the same classes with a different self-attention):

=============  ==============================================================================
pixart         sample (B,C,h,w) f32, timestep (B,) f32, encoder_hidden_states (B,L,D) f32,
               encoder_attention_mask (B,L) i64 (1 keep, 0 pad) -> noise_pred (B,C_out,h,w) f32
dit            sample, timestep, class_labels (B,) i64 -> noise_pred
sd3            sample, timestep, encoder_hidden_states (B,L,D), pooled_projections (B,P)
               -> noise_pred
=============  ==============================================================================

Text encoders (:func:`text_encoder_wrapper` picks by class):

===========================  ================================================================
T5EncoderModel, UMT5         input_ids (B,L) i64, attention_mask (B,L) i64 -> last_hidden_state (B,L,D)
CLIPTextModelWithProjection  input_ids (B,L) i64 -> hidden_states (B,L,D) (the penultimate layer's,
                             as SD3 uses it), text_embeds (B,P) (projected pooled output)
===========================  ================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from litedge.errors import LitedgeError
from litedge.export.rewrites import Rank4Unpatchify, run_until

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (int fixed, str symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def manifest(self) -> dict:
        """The manifest's form: ``{"dtype": "float32", "shape": ["batch", 4, "height", "width"]}``."""
        return {"dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ComponentSpec:
    """Inputs and outputs of one exported component, in the wrapper's positional order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def manifest_inputs(self) -> dict[str, dict]:
        return {t.name: t.manifest() for t in self.inputs}

    def manifest_outputs(self) -> dict[str, dict]:
        return {t.name: t.manifest() for t in self.outputs}


@dataclass(frozen=True)
class SampleSize:
    """Concrete sizes for the symbolic dimensions, to make sample inputs."""

    batch: int
    height: int  # latent
    width: int  # latent
    text_length: int = 8


def _float(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _mask(batch: int, length: int) -> torch.Tensor:
    """(B, L) int64 padding mask: row 0 all kept, later rows keep a shorter prefix."""
    keep = [max(1, length - (i * length) // (batch + 1)) for i in range(batch)]
    return (torch.arange(length)[None, :] < torch.tensor(keep)[:, None]).long()  # (B, L)


# ----------------------------------------------------------------------------- transformers


class TransformerWrapper(nn.Module):
    """``(sample, timestep, *conditioning) -> noise_pred`` around a diffusers transformer.

    Runs the model up to its final linear layer (:func:`run_until`) and finishes with the
    rank-4 unpatchify (:class:`Rank4Unpatchify`), so the graph has no rank-6 tensor.
    Subclasses name the final layer, the conditioning inputs and how they map to the
    model's keyword arguments.
    """

    kind: ClassVar[str]
    proj_out_name: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch_size = int(model.config.patch_size)
        # Named like the layer it replaces, so ONNX node names read "/proj_out/MatMul".
        self.proj_out = Rank4Unpatchify(getattr(model, self.proj_out_name), self.patch_size, model.out_channels)

    def model_kwargs(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must map its inputs to the model's keyword arguments")

    def conditioning_specs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError(f"{type(self).__name__} must describe its conditioning inputs")

    def conditioning_samples(self, size: SampleSize, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError(f"{type(self).__name__} must make sample conditioning inputs")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent, (B,) timesteps, conditioning -> (B, C_out, h, w) model output."""
        tokens = run_until(self.model, getattr(self.model, self.proj_out_name), **self.model_kwargs(sample, timestep, *cond))
        p = self.patch_size
        return self.proj_out(tokens, sample.shape[-2] // p, sample.shape[-1] // p)

    def spec(self) -> ComponentSpec:
        cfg = self.model.config
        latent = ("batch", int(cfg.in_channels), "height", "width")
        inputs = (
            TensorSpec("sample", "float32", latent),
            TensorSpec("timestep", "float32", ("batch",)),
            *self.conditioning_specs(),
        )
        out = ("batch", int(self.model.out_channels), "height", "width")
        return ComponentSpec(inputs, (TensorSpec("noise_pred", "float32", out),))

    def sample_inputs(self, size: SampleSize, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs: N(0,1) latent, timesteps in [0, 1000), kind-specific conditioning."""
        gen = torch.Generator().manual_seed(seed)
        sample = _float((size.batch, int(self.model.config.in_channels), size.height, size.width), gen)
        timestep = torch.rand(size.batch, generator=gen) * 999.0
        return (sample, timestep, *self.conditioning_samples(size, gen))

    def metadata(self) -> dict:
        """Facts the runtime needs that the shapes do not say."""
        return {"kind": self.kind, "patch_size": self.patch_size, "latent_multiple": self.patch_size}

    def derived_weights(self) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """Buffers computed from a parameter (the rank-4 unpatchify's permuted final layer): name -> (parameter, how).

        A streamed export reads them from the checkpoint through this, since a skeleton's copy is zeros.
        """
        perm, layer = self.proj_out.perm, f"model.{self.proj_out_name}"
        derived = {"proj_out.weight": (f"{layer}.weight", lambda w: w[perm])}
        if self.proj_out.bias is not None:
            derived["proj_out.bias"] = (f"{layer}.bias", lambda b: b[perm])
        return derived


class PixArtWrapper(TransformerWrapper):
    kind = "pixart"
    proj_out_name = "proj_out"

    def __init__(self, model: nn.Module) -> None:
        if model.use_additional_conditions:
            raise LitedgeError(
                "PixArt with use_additional_conditions=True (PixArt-alpha 1024) is not exportable yet: "
                "expected a PixArt-Sigma style config with use_additional_conditions=False"
            )
        super().__init__(model)

    def model_kwargs(self, sample, timestep, encoder_hidden_states, encoder_attention_mask) -> dict:
        return dict(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )

    def conditioning_specs(self) -> tuple[TensorSpec, ...]:
        d = int(self.model.config.caption_channels)
        return (
            TensorSpec("encoder_hidden_states", "float32", ("batch", "text_length", d)),
            TensorSpec("encoder_attention_mask", "int64", ("batch", "text_length")),
        )

    def conditioning_samples(self, size, gen):
        d = int(self.model.config.caption_channels)
        return _float((size.batch, size.text_length, d), gen), _mask(size.batch, size.text_length)


class DiTWrapper(TransformerWrapper):
    kind = "dit"
    proj_out_name = "proj_out_2"

    def model_kwargs(self, sample, timestep, class_labels) -> dict:
        return dict(hidden_states=sample, timestep=timestep, class_labels=class_labels, return_dict=False)

    def conditioning_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("class_labels", "int64", ("batch",)),)

    def conditioning_samples(self, size, gen):
        classes = int(self.model.config.num_embeds_ada_norm)
        return (torch.randint(0, classes, (size.batch,), generator=gen),)

    def metadata(self) -> dict:
        return {**super().metadata(), "num_classes": int(self.model.config.num_embeds_ada_norm)}


class SD3Wrapper(TransformerWrapper):
    kind = "sd3"
    proj_out_name = "proj_out"

    def model_kwargs(self, sample, timestep, encoder_hidden_states, pooled_projections) -> dict:
        return dict(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )

    def conditioning_specs(self) -> tuple[TensorSpec, ...]:
        cfg = self.model.config
        return (
            TensorSpec("encoder_hidden_states", "float32", ("batch", "text_length", int(cfg.joint_attention_dim))),
            TensorSpec("pooled_projections", "float32", ("batch", int(cfg.pooled_projection_dim))),
        )

    def conditioning_samples(self, size, gen):
        cfg = self.model.config
        return (
            _float((size.batch, size.text_length, int(cfg.joint_attention_dim)), gen),
            _float((size.batch, int(cfg.pooled_projection_dim)), gen),
        )

    def metadata(self) -> dict:
        # The cropped position table bounds the latent: larger inputs fail at run time.
        largest = int(self.model.config.pos_embed_max_size) * self.patch_size
        return {**super().metadata(), "max_height": largest, "max_width": largest}


TRANSFORMER_WRAPPERS: dict[str, type[TransformerWrapper]] = {
    "PixArtTransformer2DModel": PixArtWrapper,
    "DiTTransformer2DModel": DiTWrapper,
    "SD3Transformer2DModel": SD3Wrapper,
}


def transformer_wrapper(model: nn.Module) -> TransformerWrapper:
    """The wrapper for a diffusers transformer (teacher or student), chosen by its class."""
    from litedge.models.linearize import diffusers_class_name

    name = diffusers_class_name(model) or type(model).__name__  # a Litedge* student class exports as its teacher's
    if name not in TRANSFORMER_WRAPPERS:
        raise LitedgeError(f"cannot export a {type(model).__name__} as a transformer: expected one of {sorted(TRANSFORMER_WRAPPERS)}")
    return TRANSFORMER_WRAPPERS[name](model)


# ----------------------------------------------------------------------------- VAE decoder


# The diffusers VAE classes a bundle's vae_decoder is exported from, by ``_class_name``.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")


def vae_class_name(config) -> str:
    """``config``'s VAE class (a vae/config.json dict or a diffusers config): one of :data:`VAE_CLASSES`.

    ``_class_name`` decides; a config without one is an AutoencoderKL if it has
    ``block_out_channels``, an AutoencoderDC if it has ``decoder_block_out_channels``.

    Raises:
        LitedgeError: any other class (one line naming the supported ones).
    """
    name = config.get("_class_name")
    if name is None:
        name = "AutoencoderDC" if "decoder_block_out_channels" in config else "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise LitedgeError(f"vae/config.json names a {name}: litedge exports the VAE decoder of a diffusers "
                           f"{' or '.join(VAE_CLASSES)}; convert the VAE or export without vae/")
    return name


def vae_scale_factor(config) -> int:
    """Image pixels per latent pixel of a VAE config: 2 ** (decoder stages - 1).

    AutoencoderKL: ``block_out_channels`` (SD/SDXL/SD3: 4 stages -> 8); AutoencoderDC:
    ``decoder_block_out_channels`` (SANA's DC-AE: 6 stages -> 32).
    """
    key = "decoder_block_out_channels" if vae_class_name(config) == "AutoencoderDC" else "block_out_channels"
    stages = config.get(key)
    if not isinstance(stages, (list, tuple)) or not stages:
        raise LitedgeError(f"vae/config.json has no {key} list: expected the decoder's channels per stage")
    return 2 ** (len(stages) - 1)


def vae_latent_channels(config) -> int:
    """Latent channels of a VAE config (``latent_channels``; diffusers' defaults: KL 4, DC 32)."""
    default = 32 if vae_class_name(config) == "AutoencoderDC" else 4
    return int(config.get("latent_channels", default))


@contextlib.contextmanager
def _movedim_as_permute():
    """``Tensor.movedim`` written as ``Tensor.permute`` while tracing.

    AutoencoderDC applies RMSNorm channels-last (``x.movedim(1, -1)``, ``.movedim(-1, 1)``).
    torch's legacy ONNX exporter writes ``movedim(-1, 1)`` as a Transpose with ``perm
    [0, -1, 1, 2]``, which onnxruntime refuses, and coremltools has no ``movedim``; the
    same permutation as a ``permute`` exports to both.
    """
    original = torch.Tensor.movedim

    def movedim(self, source, destination):
        n = self.dim()
        src = [d % n for d in ([source] if isinstance(source, int) else source)]
        dst = [d % n for d in ([destination] if isinstance(destination, int) else destination)]
        rest = iter(d for d in range(n) if d not in src)
        moved = dict(zip(dst, src))
        return self.permute([moved[i] if i in moved else next(rest) for i in range(n)])

    torch.Tensor.movedim = movedim
    try:
        yield
    finally:
        torch.Tensor.movedim = original


class VaeDecoderWrapper(nn.Module):
    """``latent -> image``: undoes the latent scaling in-graph, decodes, clamps to [-1, 1].

    The graph takes the latent exactly as the denoising loop ends with it (scaled space) and
    applies ``z = latent / scaling_factor + shift_factor`` (or, for VAEs with per-channel
    ``latents_mean``/``latents_std``, ``z = latent * std / scaling_factor + mean``) inside,
    like diffusers' pipelines do before ``vae.decode``. Tiling and slicing are bypassed.

    AutoencoderKL: ``post_quant_conv`` (when present) then ``decoder``. AutoencoderDC (SANA's
    deep-compression autoencoder): ``z = latent / scaling_factor`` then ``decoder`` (its
    ``decode(z).sample``); factor ``2 ** (len(decoder_block_out_channels) - 1)``, 32 for SANA's.
    """

    def __init__(self, vae: nn.Module) -> None:
        from diffusers import AutoencoderDC, AutoencoderKL

        if not isinstance(vae, (AutoencoderKL, AutoencoderDC)):
            raise LitedgeError(f"cannot export a {type(vae).__name__} as a VAE decoder: expected a diffusers "
                               f"{' or '.join(VAE_CLASSES)}")
        super().__init__()
        self.vae = vae
        self.kind = "dc" if isinstance(vae, AutoencoderDC) else "kl"
        cfg = vae.config
        channels = int(cfg.latent_channels)
        scaling = float(cfg.scaling_factor)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).reshape(1, channels, 1, 1)
            scale = torch.tensor(cfg.latents_std, dtype=torch.float32).reshape(1, channels, 1, 1) / scaling
        else:
            shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
            mean = torch.full((1, channels, 1, 1), shift)
            scale = torch.full((1, channels, 1, 1), 1.0 / scaling)
        self.register_buffer("latent_scale", scale)  # (1, C, 1, 1)
        self.register_buffer("latent_shift", mean)  # (1, C, 1, 1)
        self.scale_factor = vae_scale_factor(dict(cfg, _class_name=type(vae).__name__))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latent -> (B, 3, h * f, w * f) image in [-1, 1], f = vae_scale_factor."""
        z = latent * self.latent_scale + self.latent_shift
        if self.kind == "dc":
            with _movedim_as_permute():
                return self.vae.decoder(z).clamp(-1.0, 1.0)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z).clamp(-1.0, 1.0)

    def spec(self) -> ComponentSpec:
        cfg = self.vae.config
        image_channels = int(getattr(cfg, "out_channels", None) or cfg.in_channels)  # a DC-AE decodes to in_channels
        latent = TensorSpec("latent", "float32", ("batch", int(cfg.latent_channels), "height", "width"))
        image = TensorSpec("image", "float32", ("batch", image_channels, "image_height", "image_width"))
        return ComponentSpec((latent,), (image,))

    def sample_inputs(self, size: SampleSize, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """A N(0,1) latent: the scale of what a denoising loop ends with."""
        gen = torch.Generator().manual_seed(seed)
        return (_float((size.batch, int(self.vae.config.latent_channels), size.height, size.width), gen),)

    def metadata(self) -> dict:
        cfg = self.vae.config
        return {
            "latent_scaling": "in-graph",  # feed the loop's final latent as is
            "vae_class": type(self.vae).__name__,
            "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0,
            "per_channel_latents_stats": getattr(cfg, "latents_mean", None) is not None,
            "vae_scale_factor": self.scale_factor,
            # channels per decoder stage, full resolution first (the runtime's memory estimate)
            "decoder_channels": [int(c) for c in (cfg.decoder_block_out_channels if self.kind == "dc"
                                                  else cfg.block_out_channels)],
            "output_range": [-1.0, 1.0],  # image = clamp(decode(z), -1, 1); pixels = (image + 1) * 127.5
        }


# ----------------------------------------------------------------------------- text encoder


class TextEncoderWrapper(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` around a transformers T5 encoder."""

    supported: ClassVar[tuple[str, ...]] = ("T5EncoderModel", "UMT5EncoderModel")

    def __init__(self, encoder: nn.Module) -> None:
        if type(encoder).__name__ not in self.supported:
            raise LitedgeError(
                f"cannot export a {type(encoder).__name__} as a text encoder: expected one of {list(self.supported)}"
            )
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 token ids, (B, L) int64 mask (1 keep) -> (B, L, D) float32."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def spec(self) -> ComponentSpec:
        d = int(self.encoder.config.d_model)
        return ComponentSpec(
            (
                TensorSpec("input_ids", "int64", ("batch", "text_length")),
                TensorSpec("attention_mask", "int64", ("batch", "text_length")),
            ),
            (TensorSpec("last_hidden_state", "float32", ("batch", "text_length", d)),),
        )

    def sample_inputs(self, size: SampleSize, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random token ids in the vocabulary and a padding mask."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, int(self.encoder.config.vocab_size), (size.batch, size.text_length), generator=gen)
        return ids, _mask(size.batch, size.text_length)

    def metadata(self) -> dict:
        return {"kind": type(self.encoder).__name__, "hidden_size": int(self.encoder.config.d_model)}


class ClipTextEncoderWrapper(nn.Module):
    """``input_ids -> (penultimate hidden state, text_embeds)`` around a ``CLIPTextModelWithProjection``.

    What diffusers' ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` takes from each CLIP
    (``clip_skip=None``): ``hidden_states[-2]`` and the projected pooled output. No attention
    mask, as there: CLIP is causal and pooled at the first end-of-text token.
    """

    supported: ClassVar[tuple[str, ...]] = ("CLIPTextModelWithProjection",)

    def __init__(self, encoder: nn.Module) -> None:
        if type(encoder).__name__ not in self.supported:
            raise LitedgeError(
                f"cannot export a {type(encoder).__name__} as a CLIP text encoder: expected one of {list(self.supported)}"
            )
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) int64 token ids -> (B, L, D) float32 penultimate states, (B, P) float32 text_embeds."""
        out = self.encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds

    def spec(self) -> ComponentSpec:
        cfg = self.encoder.config
        return ComponentSpec(
            (TensorSpec("input_ids", "int64", ("batch", "text_length")),),
            (
                TensorSpec("hidden_states", "float32", ("batch", "text_length", int(cfg.hidden_size))),
                TensorSpec("text_embeds", "float32", ("batch", int(cfg.projection_dim))),
            ),
        )

    def sample_inputs(self, size: SampleSize, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random token ids with one end-of-text token per row (where CLIP pools)."""
        gen = torch.Generator().manual_seed(seed)
        cfg = self.encoder.config
        ids = torch.randint(0, int(cfg.vocab_size), (size.batch, size.text_length), generator=gen)
        eos = int(cfg.eos_token_id)
        if 0 <= eos < int(cfg.vocab_size):
            ids[ids == eos] = (eos + 1) % int(cfg.vocab_size)
            ids[torch.arange(size.batch), torch.randint(0, size.text_length, (size.batch,), generator=gen)] = eos
        return (ids,)

    def metadata(self) -> dict:
        cfg = self.encoder.config
        return {"kind": type(self.encoder).__name__, "hidden_size": int(cfg.hidden_size),
                "projection_dim": int(cfg.projection_dim), "hidden_state": "penultimate",
                "max_position_embeddings": int(cfg.max_position_embeddings)}


TEXT_ENCODER_WRAPPERS: dict[str, type[nn.Module]] = {
    **{name: TextEncoderWrapper for name in TextEncoderWrapper.supported},
    **{name: ClipTextEncoderWrapper for name in ClipTextEncoderWrapper.supported},
}


def text_encoder_wrapper(encoder: nn.Module) -> nn.Module:
    """The wrapper for a transformers text encoder (T5 or CLIP with projection), chosen by its class."""
    name = type(encoder).__name__
    if name not in TEXT_ENCODER_WRAPPERS:
        raise LitedgeError(f"cannot export a {name} as a text encoder: expected one of {sorted(TEXT_ENCODER_WRAPPERS)}")
    return TEXT_ENCODER_WRAPPERS[name](encoder)
