"""Prompt -> token ids for the bundle's text encoder, without transformers.

The bundle's ``tokenizer/`` folder holds either ``tokenizer.json`` (read with the
``tokenizers`` library) or a SentencePiece ``spiece.model``. Like diffusers' PixArt
pipelines (``clean_caption=False``), the text is lower-cased and stripped, the tokenizer
appends ``</s>``, and every prompt is padded to the model's ``text_max_length`` tokens; a
longer prompt is cut to that length (``</s>`` kept last) with a warning::

    tok = PromptTokenizer.from_bundle(bundle_dir, manifest.tokenizer, max_length=300)
    ids, mask = tok(["a cat", ""])       # (2, 300) int64 each; mask 1 = token, 0 = padding
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from litedge.bundle import resolve_path
from litedge.errors import LitedgeError

log = logging.getLogger("litedge.runtime")


def normalize(text: str) -> str:
    """diffusers' PixArt text preprocessing without caption cleaning: lower-case, strip."""
    return text.lower().strip()


class PromptTokenizer:
    """Encode prompts to fixed-length ``(ids, mask)``; pads with ``pad_id``, ends with ``eos_id``."""

    def __init__(self, encode, pad_id: int, eos_id: int | None, max_length: int, lowercase: bool = True) -> None:
        if max_length <= 0:
            raise LitedgeError(f"text_max_length must be a positive number of tokens, got {max_length}; "
                               "re-export the bundle")
        self._encode = encode  # str -> list[int], special tokens included, untruncated
        self.pad_id, self.eos_id, self.max_length, self.lowercase = pad_id, eos_id, max_length, lowercase

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, spec: dict | None, max_length: int,
                    lowercase: bool = True) -> PromptTokenizer:
        """The tokenizer the manifest's ``tokenizer`` section names (``{"kind", "path"}``).

        ``lowercase``: :func:`normalize` prompts first (PixArt); False passes them as given (SD3).
        """
        if not spec or "path" not in spec:
            raise LitedgeError("this text-to-image bundle has no tokenizer; re-export it from a pipeline "
                               "directory that has tokenizer/")
        folder = resolve_path(bundle_dir, spec["path"])
        try:
            if (folder / "tokenizer.json").is_file():
                tok = cls._from_tokenizers(folder, max_length)
            elif (folder / "spiece.model").is_file():
                tok = cls._from_sentencepiece(folder / "spiece.model", max_length)
            else:
                raise LitedgeError(f"{folder}: neither tokenizer.json nor spiece.model; re-export the bundle")
        except LitedgeError:
            raise
        except Exception as e:  # noqa: BLE001  tokenizers / sentencepiece / json raise their own types on garbage
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise LitedgeError(f"{folder}: the tokenizer cannot be read ({first}); re-export the bundle") from None
        tok.lowercase = lowercase
        return tok

    @classmethod
    def _from_tokenizers(cls, folder: Path, max_length: int) -> PromptTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        pad, eos = _token_id(tok.token_to_id, config.get("pad_token", "<pad>"), 0), None
        eos_token = config.get("eos_token", "</s>")
        if eos_token is not None:
            eos = _token_id(tok.token_to_id, eos_token, None)
        return cls(lambda text: tok.encode(text).ids, pad, eos, max_length)

    @classmethod
    def _from_sentencepiece(cls, model: Path, max_length: int) -> PromptTokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model))
        pad = sp.pad_id() if sp.pad_id() >= 0 else 0
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
        return cls(lambda text: list(sp.encode(text)) + ([eos] if eos is not None else []), pad, eos, max_length)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) prompts -> ids (B, max_length) int64 and mask (B, max_length) int64."""
        L = self.max_length
        ids = np.full((len(texts), L), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(texts), L), dtype=np.int64)  # (B, L)
        for row, text in enumerate(texts):
            tokens = self._encode(normalize(text) if self.lowercase else text)
            if len(tokens) > L:
                log.warning("prompt %d is %d tokens but the model reads %d: the rest is ignored; shorten it",
                            row, len(tokens), L)
                tokens = tokens[: L - 1] + [self.eos_id] if self.eos_id is not None else tokens[:L]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


def _token_id(lookup, token, default):
    if isinstance(token, dict):  # {"content": "<pad>", ...} in older configs
        token = token.get("content")
    found = lookup(token) if isinstance(token, str) else None
    return default if found is None else found
