"""What the transformer is conditioned on, one class per model kind (a registry, no if/elif).

A :class:`Conditioner` checks the request's prompt / class id and returns the transformer's
conditioning inputs for the denoising loop: 2B rows with the unconditional half first when
guided (as diffusers' pipelines batch them), else B rows. Text encodings are cached per
prompt by the pipeline (the negative prompt "" above all) and each text encoder session is
released right after it ran.

=======  =================================================================================
dit      class_labels (B,) i64; the null class (num_classes) is the unconditional label
pixart   T5 ``encoder_hidden_states`` (B,L,D) + ``encoder_attention_mask`` (B,L); optional
         stored null caption for the unconditional branch
sd3      diffusers' ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G penultimate
         states (B,77,Dl+Dg) zero-padded to T5's width, then T5's (B,L,D) on the sequence
         axis (zeros without T5); pooled = CLIP-L and CLIP-G ``text_embeds`` concatenated
=======  =================================================================================
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from litedge.bundle import resolve_path, tokenizer_entries
from litedge.errors import LitedgeError
from litedge.runtime.text import PromptTokenizer

if TYPE_CHECKING:
    from litedge.runtime.pipeline import Pipeline, Request


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class Conditioner(abc.ABC):
    """How one transformer kind is conditioned; built once per pipeline."""

    kind: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()  # bundle components generation needs besides transformer, VAE

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    @abc.abstractmethod
    def check(self, prompt, class_id, null_caption) -> None:
        """Raise LitedgeError (one line) for a request this kind cannot take."""

    @abc.abstractmethod
    def __call__(self, req: Request) -> dict[str, np.ndarray]:
        """The transformer's conditioning inputs: (2B, ...) unconditional first when guided, else (B, ...)."""

    def metadata(self, base: dict) -> dict:
        """The PNG metadata of a request (``base`` from the request's fields)."""
        return base


class ClassConditioner(Conditioner):
    """DiT-like: an ImageNet class id; the null class ``num_classes`` is the unconditional label."""

    kind = "dit"

    def check(self, prompt, class_id, null_caption) -> None:
        classes = int(self.pipe.manifest.model.get("num_classes", 1000))
        if prompt:
            raise LitedgeError("this bundle is class-conditional: give a class id (--class ID), not a prompt")
        if not is_int(class_id) or not 0 <= class_id < classes:
            raise LitedgeError(f"this bundle is class-conditional: class id must be an integer in "
                               f"[0, {classes}), got {class_id!r}; pass --class ID")

    def __call__(self, req: Request) -> dict[str, np.ndarray]:
        guided, B = req.guidance_scale != 1.0, req.batch
        null = int(self.pipe.manifest.model.get("num_classes", 1000))
        labels = ([null] * B if guided else []) + [req.class_id] * B
        return {"class_labels": np.asarray(labels, dtype=np.int64)}  # (2B,) or (B,)

    def metadata(self, base: dict) -> dict:
        return {k: v for k, v in base.items() if k not in ("prompt", "negative_prompt")}


class TextConditioner(Conditioner):
    """Prompt-conditioned: encodes [negative, prompt] (or [prompt]) once each, repeats per image."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__(pipe)
        self._tokenizers: dict[str, PromptTokenizer] = {}

    def check(self, prompt, class_id, null_caption) -> None:
        if class_id is not None:
            raise LitedgeError("this bundle is text-to-image: give a prompt, not a class id")
        if not isinstance(prompt, str):
            raise LitedgeError(f"prompt must be a string, got {type(prompt).__name__}")
        if null_caption:
            raise LitedgeError("this bundle has no null caption embedding: leave null_caption off "
                               "(the negative prompt is encoded instead)")

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Prompts -> conditioning arrays with one row per text (uncached; releases the encoders)."""

    def _tokenizer(self, key: str, max_length: int, lowercase: bool) -> PromptTokenizer:
        """The bundle's tokenizer ``key`` ("tokenizer", "tokenizer_2", ...), loaded once."""
        if key not in self._tokenizers:
            spec = tokenizer_entries(self.pipe.manifest.tokenizer).get(key)
            self._tokenizers[key] = PromptTokenizer.from_bundle(self.pipe.bundle_dir, spec, max_length, lowercase)
        return self._tokenizers[key]

    def _run(self, component: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run one text encoder and release it (text encoders never stay loaded for the loop)."""
        out = self.pipe._session(component).run_all(**feeds)
        self.pipe.release(component)
        return out

    def texts(self, req: Request) -> list[str]:
        return [req.negative_prompt, req.prompt] if req.guidance_scale != 1.0 else [req.prompt]

    def __call__(self, req: Request) -> dict[str, np.ndarray]:
        cond = self.pipe.encode_text(self.texts(req))  # name -> (T, ...)
        return {name: np.repeat(value, req.batch, axis=0) for name, value in cond.items()}  # (T*B, ...)


class T5Conditioner(TextConditioner):
    """PixArt-like: T5 features and padding mask; the stored null caption can replace the negative prompt."""

    kind = "pixart"
    required = ("text_encoder",)

    def check(self, prompt, class_id, null_caption) -> None:
        super().check(prompt, class_id, null_caption and "null_caption" not in self.pipe.manifest.components)

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        tok = self._tokenizer("tokenizer", int(self.pipe.manifest.model.get("text_max_length", 300)), True)
        ids, mask = tok(texts)  # (T, L) each
        embeds = self._run("text_encoder", input_ids=ids, attention_mask=mask)["last_hidden_state"]
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}  # (T, L, D), (T, L)

    def texts(self, req: Request) -> list[str]:
        return [req.prompt] if req.null_caption else super().texts(req)

    def __call__(self, req: Request) -> dict[str, np.ndarray]:
        cond = super().__call__(req)
        if req.guidance_scale != 1.0 and req.null_caption:
            path = resolve_path(self.pipe.bundle_dir, self.pipe.manifest.components["null_caption"].file)
            with np.load(path, allow_pickle=False) as data:  # (1, L, D), (1, L)
                null = {"encoder_hidden_states": data["embeds"].astype(np.float32),
                        "encoder_attention_mask": data["mask"].astype(np.int64)}
            cond = {k: np.concatenate([np.repeat(null[k], req.batch, axis=0), v]) for k, v in cond.items()}
        return cond


class SD3Conditioner(TextConditioner):
    """SD3 / MM-EDiT: two CLIPs and an optional T5, joined as diffusers' ``encode_prompt`` does."""

    kind = "sd3"
    required = ("text_encoder", "text_encoder_2")
    clips = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # CLIP-L, CLIP-G
    t5 = ("text_encoder_3", "tokenizer_3")

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        model = self.pipe.manifest.model
        states, pooled = [], []
        for component, tokenizer in self.clips:
            ids, _ = self._tokenizer(tokenizer, int(model.get("clip_max_length", 77)), False)(texts)  # (T, 77)
            out = self._run(component, input_ids=ids)
            states.append(out["hidden_states"])  # (T, 77, D_i): the penultimate layer
            pooled.append(out["text_embeds"])  # (T, P_i)
        t5 = self._t5(texts, int(model.get("text_max_length", 256)))  # (T, L, D_t5)
        clip = np.concatenate(states, axis=-1)  # (T, 77, Dl + Dg)
        width = t5.shape[-1]
        if clip.shape[-1] > width:
            raise LitedgeError(f"CLIP features are {clip.shape[-1]} wide but the transformer reads {width}: "
                               "the bundle's text encoders do not belong to its transformer; re-export it")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))  # (T, 77, D_t5)
        return {"encoder_hidden_states": np.concatenate([clip, t5], axis=1).astype(np.float32),  # (T, 77+L, D)
                "pooled_projections": np.concatenate(pooled, axis=-1).astype(np.float32)}  # (T, Pl + Pg)

    def _t5(self, texts: list[str], length: int) -> np.ndarray:
        """T5 states (T, L, D) without an attention mask, as diffusers runs it; zeros when the bundle has no T5."""
        component, tokenizer = self.t5
        if component not in self.pipe.manifest.components:
            width = int(self.pipe.manifest.model["joint_attention_dim"])
            return np.zeros((len(texts), length, width), dtype=np.float32)
        ids, _ = self._tokenizer(tokenizer, length, False)(texts)  # (T, L)
        return self._run(component, input_ids=ids, attention_mask=np.ones_like(ids))["last_hidden_state"]


CONDITIONERS: dict[str, type[Conditioner]] = {c.kind: c for c in (ClassConditioner, T5Conditioner, SD3Conditioner)}
