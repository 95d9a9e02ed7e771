"""Random weights written tensor by tensor as sharded safetensors, without ever holding the model.

A module is constructed under :func:`meta_parameters` (its parameters live on the meta device,
its buffers stay real), so a 4.8 B-parameter T5-XXL costs no memory. :func:`write_weights`
then plans the tensors in ``state_dict`` order, splits them into shards the way transformers
and diffusers do, and streams each tensor into its file in chunks of at most 8 M values,
drawn from a generator seeded by (seed, role, tensor name): peak memory is one chunk plus the
module's buffers, and a tensor's values do not depend on the shard layout.

The init keeps activations finite and of unit scale in fp32 and in bf16: normal weights with
std 1/sqrt(fan_in), residual-branch output projections further scaled by 1/sqrt(2 * depth),
norm scales 1, biases 0, embeddings std 1 (see :func:`init_rule`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from litedge.errors import LitedgeError

CHUNK = 8 * 2**20  # values generated at once (32 MB in fp32)
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
             torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}
# Last projection of a residual branch (T5 o/wo, CLIP out_proj/fc2, diffusers to_out/ff/proj, VAE conv2).
_OUTPUT_PROJECTION = re.compile(r"(\.o|\.wo|out_proj|fc2|to_out\.0|to_add_out|net\.2|attn\d?\.proj|conv2)\.weight$")


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside it, every ``nn.Parameter`` a module registers is moved to the meta device (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextmanager
def deferred_sincos_tables(tables: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """Inside it, diffusers' ``get_2d_sincos_pos_embed`` returns a meta tensor and appends
    ``(embed_dim, grid)`` to ``tables``; :func:`plan` turns such a buffer into an entry that
    diffusers' own ``get_2d_sincos_pos_embed_from_grid`` fills a few grid rows at a time.

    SD3.5's (1, 147456, 1536) table is 0.9 GB in fp32 and diffusers computes it through
    float64 (a 3-4 GB transient); deferred, it is written in 32 MB chunks.
    """
    from diffusers.models import embeddings

    original = embeddings.get_2d_sincos_pos_embed

    def deferred(embed_dim, grid_size, *args, **kwargs):
        if args or kwargs.get("cls_token") or kwargs.get("extra_tokens"):
            return original(embed_dim, grid_size, *args, **kwargs)
        from_grid = embeddings.get_2d_sincos_pos_embed_from_grid
        embeddings.get_2d_sincos_pos_embed_from_grid = lambda dim, grid, output_type="pt": grid
        try:  # diffusers' own grid (2, 1, H, W), without the embedding
            grid = original(embed_dim, grid_size, **kwargs)
        finally:
            embeddings.get_2d_sincos_pos_embed_from_grid = from_grid
        tables.append((embed_dim, grid))
        return torch.empty(grid[0].numel(), embed_dim, device="meta")

    embeddings.get_2d_sincos_pos_embed = deferred
    try:
        yield
    finally:
        embeddings.get_2d_sincos_pos_embed = original


@dataclass(frozen=True)
class Entry:
    """One tensor to write: a random rule ("normal" with ``std``, "ones", "zeros"), a real buffer, or
    a deferred "sincos" table (``table``: embed_dim and diffusers' position grid)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rule: str
    std: float = 0.0
    buffer: torch.Tensor | None = None
    table: tuple[int, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def init_rule(module: nn.Module, name: str, shape: tuple[int, ...], key: str, depth: int,
              extra_scale: dict[str, float] | None = None) -> tuple[str, float]:
    """(rule, std) for parameter ``name`` of ``module``: see the module docstring."""
    if name == "bias":
        return "zeros", 0.0
    if len(shape) == 1:  # LayerNorm / GroupNorm / RMSNorm / T5LayerNorm scales
        return "ones", 0.0
    if isinstance(module, nn.Embedding):
        return "normal", 1.0
    if name == "weight":
        std = 1.0 / math.sqrt(max(math.prod(shape[1:]), 1))  # fan_in: in (/groups) x kernel
        if _OUTPUT_PROJECTION.search(key):
            std /= math.sqrt(2 * max(depth, 1))
    else:  # free tables such as PixArt's scale_shift_table
        std = 1.0 / math.sqrt(max(shape[-1], 1))
    for pattern, scale in (extra_scale or {}).items():
        if re.search(pattern, key):
            std *= scale
    return "normal", std


def plan(model: nn.Module, dtype: torch.dtype, depth: int, extra_scale: dict[str, float] | None = None,
         tables: list[tuple[int, torch.Tensor]] = ()) -> list[Entry]:
    """The tensors ``model.state_dict()`` would save, tied duplicates dropped, in order.

    ``tables``: what :func:`deferred_sincos_tables` recorded while ``model`` was built.
    """
    buffers = {id(b) for b in model.buffers()}
    entries, seen = [], set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weights (T5's encoder.embed_tokens = shared) are saved once
            continue
        seen.add(id(tensor))
        shape = tuple(tensor.shape)
        if id(tensor) in buffers and tensor.device.type == "meta":  # a deferred position table (1, N, D)
            table = next((t for t in tables if (1, t[1][0].numel(), t[0]) == shape), None)
            if table is None:
                raise LitedgeError(f"buffer {key} {shape} has no values: build the model outside meta_parameters")
            entries.append(Entry(key, shape, dtype, "sincos", table=table))
            continue
        if id(tensor) in buffers or tensor.device.type != "meta":
            value = tensor.detach()
            out_dtype = dtype if value.is_floating_point() else value.dtype
            entries.append(Entry(key, shape, out_dtype, "buffer", buffer=value))
            continue
        prefix, _, name = key.rpartition(".")
        rule, std = init_rule(model.get_submodule(prefix), name, shape, key, depth, extra_scale)
        entries.append(Entry(key, shape, dtype, rule, std))
    return entries


def _seed(seed: int, role: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{role}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _chunks(entry: Entry, seed: int, role: str) -> Iterator[torch.Tensor]:
    """The flattened values of ``entry`` in its dtype, at most :data:`CHUNK` at a time."""
    if entry.rule == "buffer":
        yield entry.buffer.reshape(-1).to(entry.dtype).contiguous()
        return
    if entry.rule == "sincos":
        from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

        dim, grid = entry.table  # grid (2, 1, H, W): rows of it are consecutive positions
        rows = max(1, CHUNK // (grid.shape[-1] * dim))
        for r in range(0, grid.shape[2], rows):
            part = get_2d_sincos_pos_embed_from_grid(dim, grid[:, :, r : r + rows], output_type="pt")
            yield part.float().to(entry.dtype).reshape(-1)  # (rows * W * D,), as diffusers' .float()
        return
    total = math.prod(entry.shape)
    generator = torch.Generator().manual_seed(_seed(seed, role, entry.key)) if entry.rule == "normal" else None
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        if entry.rule == "normal":
            yield torch.randn(n, generator=generator).mul_(entry.std).to(entry.dtype)
        else:
            yield (torch.ones if entry.rule == "ones" else torch.zeros)(n, dtype=entry.dtype)


def write_safetensors(path: Path, entries: list[Entry], seed: int, role: str) -> None:
    """One safetensors file (header, then each tensor's bytes in order), streamed chunk by chunk."""
    header, offset = {}, 0
    for e in entries:
        header[e.key] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            for chunk in _chunks(e, seed, role):
                f.write(chunk.view(torch.uint8).numpy().data)


def shard(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_weights(folder: Path, entries: list[Entry], *, weights_name: str, index_name: str, seed: int,
                  role: str, max_shard_bytes: int) -> list[str]:
    """``weights_name`` alone, or ``NAME-0000k-of-0000N.safetensors`` shards + ``index_name``; returns the files.

    The index is diffusers' / transformers' ``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``.
    """
    total = sum(e.nbytes for e in entries)
    free = shutil.disk_usage(folder).free
    if total > free:
        raise LitedgeError(f"{folder}: {total / 1e9:.1f} GB of weights to write but {free / 1e9:.1f} GB free on "
                           "that disk; free space or choose another output folder")
    groups = shard(entries, max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(folder / weights_name, entries, seed, role)
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    names = [f"{stem}-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    weight_map = {}
    for name, group in zip(names, groups):
        write_safetensors(folder / name, group, seed, role)
        weight_map.update({e.key: name for e in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, index_name]
