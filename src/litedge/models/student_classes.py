"""Student transformer classes that diffusers itself can load.

A student folder saved by :func:`litedge.models.student.save_transformer` names one of these
classes in ``transformer/config.json`` (``_class_name``) and in the pipeline's
``model_index.json`` (``"transformer": ["litedge", "LitedgePixArtTransformer2DModel"]``), so

    import litedge
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("lit-student/")

builds the student's linear attention and loads its trained weights. (diffusers resolves a
library that is not its own from ``sys.modules`` only: ``import litedge`` first. Without it,
diffusers stops with an error naming litedge instead of building softmax attention.)

Each class is its diffusers teacher class plus one config field, ``litedge``: the
:class:`~litedge.models.linearize.LinearizeConfig` as a dict (family, heads, kernel size,
...). Construction builds the teacher architecture, then applies ``linearize_`` with it, so
the parameters are exactly those of a student made by :func:`litedge.models.linearize`.
The constructor's signature is the teacher's (read from diffusers at import time, so it
follows the installed diffusers) with ``litedge`` added as a keyword-only argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from diffusers import DiTTransformer2DModel, ModelMixin, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from litedge.errors import LitedgeError
from litedge.models.linearize import LinearizeConfig, linearize_, linearize_config_of
from litedge.models.student import STUDENT_CONFIG_KEY

# diffusers' pipeline loader looks ModelMixin up in the module a model_index.json entry names
# (["litedge", ...], or this module after diffusers' own save_pretrained) to pick a load method.
__all__ = ["LitedgeDiTTransformer2DModel", "LitedgePixArtTransformer2DModel", "LitedgeSD3Transformer2DModel",
           "ModelMixin", "STUDENT_CLASSES"]


def _student_init(base: type[nn.Module]) -> Callable[..., None]:
    """An ``__init__`` for a subclass of ``base``: ``base(**kwargs)`` then ``linearize_`` from ``litedge``."""

    def __init__(self, *args, litedge: Mapping | None = None, **kwargs) -> None:
        if litedge is None:
            raise LitedgeError(
                f"{type(self).__name__} needs its linear-attention config: pass litedge={{'family': 'lit', ...}} "
                "(a student folder's config.json holds it under 'litedge')"
            )
        cfg = LinearizeConfig.from_json(dict(litedge))
        base.__init__(self, *args, **kwargs)
        linearize_(self, cfg)
        # Record the resolved config (heads filled in), so a re-save is self-describing.
        self.register_to_config(**{STUDENT_CONFIG_KEY: linearize_config_of(self).to_json()})

    teacher = inspect.signature(base.__init__)
    extra = inspect.Parameter(STUDENT_CONFIG_KEY, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="dict | None")
    # diffusers' ConfigMixin reads the accepted config keys from this signature.
    __init__.__signature__ = teacher.replace(parameters=[*teacher.parameters.values(), extra])
    return register_to_config(__init__)


class LitedgePixArtTransformer2DModel(PixArtTransformer2DModel):
    """A LiT / EDiT student of PixArt-Sigma (or PixArt-alpha): diffusers' class with linear self-attention.

    ``forward`` is PixArtTransformer2DModel's: (B, C, H, W) latents -> (B, C_out, H, W).
    """

    __init__ = _student_init(PixArtTransformer2DModel)


class LitedgeDiTTransformer2DModel(DiTTransformer2DModel):
    """A LiT / EDiT student of a class-conditional DiT: diffusers' class with linear self-attention."""

    __init__ = _student_init(DiTTransformer2DModel)


class LitedgeSD3Transformer2DModel(SD3Transformer2DModel):
    """An MM-EDiT student of SD3 / SD3.5 (MM-DiT): EDiT linear attention for image-image pairs."""

    __init__ = _student_init(SD3Transformer2DModel)


STUDENT_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (LitedgePixArtTransformer2DModel, LitedgeDiTTransformer2DModel, LitedgeSD3Transformer2DModel)
}
