"""litedge: linear diffusion transformers (LiT, EDiT, MM-EDiT) from a PyTorch checkpoint
to images generated offline on a laptop or a phone.

The top-level package is torch-free; ``litedge.models``, ``litedge.export`` and
``litedge.distill`` need the ``export`` / ``distill`` extras (PyTorch).

The student transformer classes (``litedge.LitedgePixArtTransformer2DModel``, ...) are
exported lazily: diffusers looks them up here by the name a student folder's
``model_index.json`` gives (``["litedge", CLASS]``), and only that lookup imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from litedge.errors import LitedgeError

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (they need torch + diffusers).
_LAZY = {
    "LitedgePixArtTransformer2DModel": "litedge.models.student_classes",
    "LitedgeDiTTransformer2DModel": "litedge.models.student_classes",
    "LitedgeSD3Transformer2DModel": "litedge.models.student_classes",
    # diffusers' pipeline loader checks issubclass(cls, <library>.ModelMixin) to find a load method.
    "ModelMixin": "litedge.models.student_classes",
}

__all__ = ["LitedgeError", "__version__", *(n for n in _LAZY if n != "ModelMixin")]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'litedge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
