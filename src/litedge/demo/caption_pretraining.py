"""Teach the tiny T5 the caption grammar before it conditions an image model.

Why: the v1 teacher learnt its T5 jointly with the image loss and bound colours to shapes
(0.38) and objects to places (0.28) poorly: nothing asked the encoder to put "purple" into
the features of the word "square" that it describes, so cross-attention from image tokens
had to sort out which colour word goes with which shape word from a diffusion loss alone.
Here every token's output is trained to name what it belongs to:

- object words (article/number, colour, shape): their object's colour, shape, count and
  slot (first or second object of the caption);
- every token (also "and", relation words and ``</s>``): the caption's category and relation.

so each noun's feature carries its whole object and its role ("the subject, a red circle,
left of the reference"), linearly readable. The encoder is then frozen for the image
stages (its features are cached per caption: the grammar is closed, ~1,200 training
captions), which also makes teacher steps cheaper. ``evaluate`` reports per-label accuracy
on the held-out evaluation captions, whose compositions never occur in training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from litedge.demo.shapes import CATEGORIES, COLOURS, RELATIONS, SHAPES, parse_caption

IGNORE = -100
LABELS = {"colour": len(COLOURS), "shape": len(SHAPES), "count": 3, "slot": 2, "relation": len(RELATIONS) + 1,
          "category": len(CATEGORIES)}


def token_labels(caption: str, length: int) -> dict[str, np.ndarray]:
    """Per-token targets (each (length,) int64, IGNORE where none) of a caption tokenized word by word + ``</s>``.

    The grammar puts an object in the first three words and, for two objects, the last three.
    """
    spec = parse_caption(caption)
    words = caption.lower().split()
    n = min(len(words) + 1, length)  # + </s>
    out = {k: np.full(length, IGNORE, np.int64) for k in LABELS}
    out["category"][:n] = CATEGORIES.index(spec.category)
    out["relation"][:n] = 0 if spec.relation is None else 1 + RELATIONS.index(spec.relation)
    spans = [range(0, 3)] + ([range(len(words) - 3, len(words))] if len(spec.objects) == 2 else [])
    for slot, (span, obj) in enumerate(zip(spans, spec.objects)):
        for i in span:
            if i < n:
                out["colour"][i], out["shape"][i] = list(COLOURS).index(obj.colour), SHAPES.index(obj.shape)
                out["count"][i], out["slot"][i] = obj.count - 1, slot
    return out


def label_arrays(captions: list[str], length: int) -> dict[str, np.ndarray]:
    """:func:`token_labels` of many captions stacked: name -> (N, length) int64."""
    rows = [token_labels(c, length) for c in captions]
    return {k: np.stack([r[k] for r in rows]) for k in LABELS}


class CaptionHeads(nn.Module):
    """One linear classifier per label on the encoder's (B, L, D) output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in LABELS.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(features) for k, head in self.heads.items()}  # name -> (B, L, classes)


def caption_loss(model: nn.ModuleDict, ids: torch.Tensor, mask: torch.Tensor,
                 labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model = {text_encoder, heads}; ids, mask (B, L); labels name -> (B, L) -> CE per label and ``total``."""
    features = model["text_encoder"](input_ids=ids, attention_mask=mask)[0]
    logits = model["heads"](features)
    terms = {k: F.cross_entropy(v.flatten(0, 1), labels[k].flatten(), ignore_index=IGNORE) for k, v in logits.items()}
    terms["total"] = sum(terms.values())
    return terms


@torch.no_grad()
def evaluate(model: nn.ModuleDict, ids: torch.Tensor, mask: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    """Per-label token accuracy (where a label applies) and the share of captions with every label right."""
    logits = model["heads"](model["text_encoder"](input_ids=ids, attention_mask=mask)[0])
    acc, all_right = {}, torch.ones(ids.shape[0], dtype=torch.bool)
    for k, v in logits.items():
        valid = labels[k] != IGNORE
        right = (v.argmax(-1) == labels[k]) | ~valid
        acc[k] = round(float(right[valid].float().mean()), 4)
        all_right &= right.all(dim=1)
    return {"token_accuracy": acc, "captions_all_right": round(float(all_right.float().mean()), 4)}
