"""Export-friendly rewrites of diffusers models, active only while an export runs.

Nothing here changes a user's model for good: hooks are removed and attributes restored
when the ``with`` block or call ends, even on error.

- :class:`Rank4Unpatchify`: diffusers' unpatchify is a rank-6 reshape + einsum, which
  breaks Core ML multi-shape models (rank <= 5) and falls back to CPU on QNN. The same
  result comes from the final linear layer with its rows permuted, a rank-4 reshape, a
  transpose and ``pixel_shuffle`` (exact: only the order of the outputs changes).
- :func:`run_until`: runs a diffusers transformer up to (not into) its final linear layer
  and returns that layer's input, so the rank-6 tail is never traced.
- :func:`bound_attention_` / :func:`bounded_attention`: softmax attention in query chunks
  (an ONNX ``Loop``), so an exported softmax teacher never holds its (B, heads, N, N) scores.
- :func:`dynamic_pos_embed`: makes diffusers' ``PatchEmbed`` recompute its sin-cos position
  embedding from the input's height and width on every call, so a traced graph computes it
  for the size it is run at instead of baking the stored table of the config's size.
- :func:`fuse_written_graph`: onnxruntime's transformer fusions (FastGelu, SkipLayerNorm)
  applied to a graph already written with its weights in an external data file, without
  loading those weights. Not applied by the cpu target: on XL-width students at 1024 px the
  fused graph ran 1.000x (4 layers, ``bench/xl_speed.py --fusion-ab``) and 1.027x (6 layers)
  the plain one's CPU time; the cpu target fuses only the GELU
  (:func:`litedge.export.graph_fusions.fuse_gelu_tanh`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

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
        self.perm = perm  # (p*p*C,) int64: the diffusers row behind each output feature (streamed export reads it)
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


# ----------------------------------------------------------------------------- bounded softmax attention

DEFAULT_SCORE_BUDGET = 1 << 26  # score elements per query chunk: 256 MB in fp32 (and as much for the softmax)
MIN_QUERY_CHUNK = 16  # queries per chunk at the least, whatever the key count


@torch.jit.script
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
    """Softmax attention computed a chunk of queries at a time (scripted: exports as an ONNX ``Loop``).

    Args:
        q: (B, heads, N, d) queries; k: (B, heads, M, d) keys; v: (B, heads, M, dv) values.
        scale: multiplies ``q k^T`` (``d ** -0.5`` for SDPA's default).
        budget: most score elements (B * heads * chunk * M) one chunk may hold; the chunk is
            ``max(MIN_QUERY_CHUNK, budget // (B * heads * M))`` queries, computed from the
            input's shape at run time, so one graph bounds memory at every size.

    Returns:
        (B, heads, N, dv): equal to ``softmax(q k^T * scale) v`` row by row (each query's row
        of scores is whole inside one chunk, so the softmax is exact, not approximated).
    """
    b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    chunk = max(16, budget // max(1, b * h * m))
    kt = k.transpose(-2, -1)  # (B, heads, d, M)
    outs: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        scores = torch.matmul(q[:, :, start:start + chunk], kt) * scale  # (B, heads, chunk, M)
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), v))  # (B, heads, chunk, dv)
    return torch.cat(outs, dim=2)  # (B, heads, N, dv)


def _bounded_sdpa(sdpa, budget: int):
    """``F.scaled_dot_product_attention`` that chunks unmasked, non-causal, dropout-free calls."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or dropout_p or kwargs or query.dim() != 4:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)
        s = float(scale) if scale is not None else float(query.shape[-1]) ** -0.5
        return chunked_attention(query, key, value, s, budget)

    return attention


class BoundedAttnProcessor:
    """Wraps a diffusers attention processor so its softmax attention runs in query chunks.

    The wrapped processor runs unchanged except that, during its call, ``F.scaled_dot_product_attention``
    is :func:`chunked_attention` for unmasked calls (self-attention; masked cross-attention
    to the prompt is N x L, small, and keeps the plain op). Restored after each call.
    """

    def __init__(self, inner: object, budget: int = DEFAULT_SCORE_BUDGET) -> None:
        self.inner, self.budget = inner, budget

    def __call__(self, attn: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _bounded_sdpa(sdpa, self.budget)
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = sdpa


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def bound_attention_(model: nn.Module, budget: int = DEFAULT_SCORE_BUDGET) -> nn.Module:
    """Make every softmax attention of a diffusers model compute its scores in query chunks.

    For exporting softmax teachers: the traced graph then holds an ONNX ``Loop`` over query
    chunks of at most ``budget`` score elements, never the (B, heads, N, N) score tensor
    (34 GB at 2048 px for PixArt-XL; 512 MB per chunk by default). Exact: same math, rows
    split. Idempotent; returns ``model``. Undo with :func:`unbound_attention_`.
    """
    for m in _attention_modules(model):
        if not isinstance(m.processor, BoundedAttnProcessor):
            m.processor = BoundedAttnProcessor(m.processor, budget)
    return model


def unbound_attention_(model: nn.Module) -> nn.Module:
    """Restore the processors :func:`bound_attention_` wrapped."""
    for m in _attention_modules(model):
        if isinstance(m.processor, BoundedAttnProcessor):
            m.processor = m.processor.inner
    return model


@contextlib.contextmanager
def bounded_attention(model: nn.Module, budget: int = DEFAULT_SCORE_BUDGET) -> Iterator[None]:
    """:func:`bound_attention_` for the ``with`` block only (restored on exit, even on error)."""
    wrapped = [m for m in _attention_modules(model) if not isinstance(m.processor, BoundedAttnProcessor)]
    try:
        bound_attention_(model, budget)
        yield
    finally:
        for m in wrapped:
            if isinstance(m.processor, BoundedAttnProcessor):
                m.processor = m.processor.inner


def teacher_for_export(loaded, *, bounded: bool = True) -> None:
    """Prepare a loaded softmax model (``litedge.models.loading.LoadedModel``) for ``lit-export --teacher``.

    With ``bounded`` (the cpu target) its attention is bounded in place (:func:`bound_attention_`:
    the model was loaded for this export only). Other targets keep the plain attention graph:
    onnxruntime's fp16 converter cannot retype the chunk loop's tensor sequence (cuda), and
    static-graph compilers (QNN, Core ML) take no ``Loop``; a GPU holds the whole scores.

    Raises:
        LitedgeError: the source is a linearized student; its checkpoint holds no teacher weights.
    """
    from litedge.errors import LitedgeError

    if loaded.linear is not None:
        raise LitedgeError(f"{loaded.source}: --teacher exports a softmax model, but this is a "
                           f"{loaded.linear.family} student (it holds no teacher weights): give the teacher's "
                           "pipeline directory, or --config NAME --random-weights --teacher")
    if bounded:
        bound_attention_(loaded.transformer)


# ----------------------------------------------------------------------------- fusions on a written graph

SMALL_TENSOR_BYTES = 1 << 16  # external tensors up to this size are read for the fusion (shape constants)


def fuse_written_graph(path: str | Path, component: str = "transformer") -> dict[str, int]:
    """Rewrite the ONNX graph at ``path`` in place with onnxruntime's CPU-runnable transformer
    fusions (:func:`litedge.export.fp16_backend.fuse_fp32`): the GELU-tanh chain becomes one
    ``FastGelu``, each residual Add + LayerNorm one ``SkipLayerNormalization``.

    The weights stay where they are: the graph is loaded without its external data, only the
    external tensors of at most :data:`SMALL_TENSOR_BYTES` (shape constants the symbolic shape
    inference reads) are brought inline, and the saved graph keeps every other tensor's
    reference (file, offset) into the same data file. A 2.4 GB fp32 transformer fuses in the
    memory of its graph. Returns the fused op counts (``fused_op_counts``).
    """
    import numpy as np
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from litedge.export.fp16_backend import fuse_fp32, fused_op_counts

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and int(np.prod(tensor.dims)) * 8 <= SMALL_TENSOR_BYTES:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    names = {n.name for n in model.graph.node}
    fused = fuse_fp32(model, component)
    del model
    _scope_fused_nodes(fused, names)
    tmp = path.with_name(path.name + ".fusing")
    onnx.save(fused, str(tmp))
    tmp.replace(path)
    return fused_op_counts(fused)


def _scope_fused_nodes(model, old_names: set[str]) -> None:
    """Name each node the fusions created (``FastGelu_0``) after the module path of a tensor it
    writes or reads (``/model/transformer_blocks.0/ff/net.0/FastGelu_0``): lit-profile ``--ops``
    groups kernels by that path."""
    for i, node in enumerate(model.graph.node):
        if node.name in old_names:
            continue
        scoped = [t for t in (*node.output, *node.input) if t.startswith("/") and "/" in t[1:]]
        if scoped:
            node.name = f"{scoped[0].rpartition('/')[0]}/{node.op_type}_{i}"
