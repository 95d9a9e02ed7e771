"""Export-friendly rewrites of diffusers models, active only while an export runs.

Nothing here changes a user's model for good: hooks are removed and attributes restored
when the ``with`` block or call ends, even on error.

- :class:`Rank4Unpatchify`: diffusers' unpatchify is a rank-6 reshape + einsum, which
  breaks Core ML multi-shape models (rank <= 5) and falls back to CPU on QNN. The same
  result comes from the final linear layer with its rows permuted, a rank-4 reshape, a
  transpose and ``pixel_shuffle`` (exact: only the order of the outputs changes).
- :func:`run_until`: runs a diffusers transformer up to (not into) its final linear layer
  and returns that layer's input, so the rank-6 tail is never traced.
- :func:`dynamic_pos_embed`: makes diffusers' ``PatchEmbed`` recompute its sin-cos position
  embedding from the input's height and width on every call, so a traced graph computes it
  for the size it is run at instead of baking the stored table of the config's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Rank4Unpatchify(nn.Module):
    """The final linear layer + unpatchify of a DiT, in rank <= 4 ops.

    diffusers computes ``proj_out(x)`` with output features ordered (p, q, C), then
    reshapes to (B, h, w, p, p, C) and permutes to (B, C, h*p, w*p). Reordering the
    layer's output features to (C, p, q) makes that permutation a ``pixel_shuffle``.

    Args:
        proj_out: the model's final ``nn.Linear`` (hidden -> p * p * out_channels). Its
            weights are copied (permuted); the layer itself is not modified.
        patch_size: p.
        out_channels: C, channels of the predicted latent.
    """

    def __init__(self, proj_out: nn.Linear, patch_size: int, out_channels: int) -> None:
        super().__init__()
        p, c = patch_size, out_channels
        if proj_out.out_features != p * p * c:
            raise ValueError(
                f"final layer has {proj_out.out_features} outputs, expected patch_size^2 * out_channels = {p * p * c}"
            )
        # perm[j] for j = (c, pi, qi) flattened is the diffusers row (pi, qi, c).
        perm = torch.arange(p * p * c).reshape(p, p, c).permute(2, 0, 1).reshape(-1)
        self.patch_size = p
        self.register_buffer("weight", proj_out.weight.detach()[perm].clone())
        bias = proj_out.bias.detach()[perm].clone() if proj_out.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, height * width, hidden) tokens -> (B, C, height * p, width * p) latent.

        ``height``/``width`` are the token grid (latent size / p); traced as symbolic sizes.
        """
        y = F.linear(tokens, self.weight, self.bias)  # (B, h*w, C*p*p), features ordered (C, p, q)
        y = y.reshape(y.shape[0], height, width, y.shape[-1])  # (B, h, w, C*p*p)
        y = y.permute(0, 3, 1, 2)  # (B, C*p*p, h, w)
        return F.pixel_shuffle(y, self.patch_size)  # (B, C, h*p, w*p)


class _ReachedModule(Exception):
    """Raised by :func:`run_until`'s hook to leave the model's forward early."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("reached the stop module")
        self.value = value


def run_until(model: nn.Module, stop: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    """Call ``model(*args, **kwargs)`` and return the first positional input of ``stop``.

    The forward is abandoned when ``stop`` is about to run, so nothing after it executes
    (and nothing after it is traced). The hook lives only for this call.

    Raises:
        RuntimeError: the forward finished without ever calling ``stop``.
    """

    def raise_input(module: nn.Module, inputs: tuple) -> None:
        raise _ReachedModule(inputs[0])

    handle = stop.register_forward_pre_hook(raise_input)
    try:
        model(*args, **kwargs)
    except _ReachedModule as reached:
        return reached.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__}.forward never called its {type(stop).__name__} layer")


def _sincos_patch_embeds(model: nn.Module) -> list[nn.Module]:
    """diffusers PatchEmbed modules whose position table is sin-cos and sized by the config."""
    from diffusers.models.embeddings import PatchEmbed

    return [
        m
        for m in model.modules()
        if isinstance(m, PatchEmbed) and m.pos_embed is not None and m.pos_embed_max_size is None
    ]


@contextlib.contextmanager
def dynamic_pos_embed(model: nn.Module) -> Iterator[None]:
    """Within the block, every sin-cos ``PatchEmbed`` recomputes its table from the input size.

    ``PatchEmbed.forward`` uses its stored table when the token grid equals the config's
    ``sample_size`` and calls ``get_2d_sincos_pos_embed(grid=(h, w))`` otherwise. Under
    tracing that Python ``if`` is decided once, at the export size; setting the stored grid
    to (-1, -1) always takes the recompute branch, which traces into ``Range``/``Sin``/``Cos``
    ops on the symbolic size. The recomputed table equals the stored one at the config size
    (same function, same arguments). SD3-style cropped tables (``pos_embed_max_size``) are
    sliced by symbolic offsets already and are left alone.
    """
    saved = [(m, m.height, m.width) for m in _sincos_patch_embeds(model)]
    try:
        for m, _, _ in saved:
            m.height = m.width = -1
        yield
    finally:
        for m, height, width in saved:
            m.height, m.width = height, width


@contextlib.contextmanager
def inference_mode_of(module: nn.Module) -> Iterator[None]:
    """``eval()`` + ``no_grad`` for the block, restoring each submodule's training flag after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training
