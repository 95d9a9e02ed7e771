"""Weights read one tensor at a time, and models that hold none until asked.

Real checkpoints are stored as (sharded) safetensors in bf16/fp16: PixArt-Sigma's T5-XXL is
19 GB in fp32, SD3.5-Medium's transformer 10 GB. Exporting them whole needs several copies
in memory, so the export streams instead:

- a :class:`WeightSource` names every tensor with its shape and returns one at a time as
  fp32 (:class:`SafetensorsWeights` reads each tensor's bytes from its shard, no memory map;
  :class:`ModuleWeights` serves an in-memory model the same way);
- :func:`empty_weights` builds a module whose parameters live on the ``meta`` device (no
  memory; buffers stay real), and :func:`placeholder_parameters` gives it stride-0 zero
  parameters of the right shapes, enough to trace a graph;
- :func:`streamed_weights` runs such a skeleton for real: each module's own parameters are
  read just before its forward and dropped right after, so a reference forward needs one
  layer's weights at a time.

Example::

    weights = SafetensorsWeights("PixArt-Sigma/text_encoder")
    with empty_weights():
        encoder = T5EncoderModel(T5Config.from_pretrained("PixArt-Sigma/text_encoder"))
    placeholder_parameters(encoder)
    weights.check_shapes({n: tuple(p.shape) for n, p in encoder.named_parameters()})
    with streamed_weights(encoder, weights):
        hidden = encoder(input_ids=ids).last_hidden_state     # peak: one layer's weights
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from litedge.errors import LitedgeError

# Names of the weight files the field's libraries write: diffusers, then transformers.
WEIGHT_FILE_STEMS = ("diffusion_pytorch_model", "model")

Transform = Callable[[str, torch.Tensor], torch.Tensor]


class WeightSource:
    """Named tensors served one at a time as fp32 CPU tensors."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a new fp32 (floating) or original-dtype (integer) CPU tensor."""
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def nbytes_fp32(self) -> int:
        """Bytes of every tensor in fp32."""
        total = 0
        for key in self.keys():
            n = 1
            for d in self.shape(key):
                n *= int(d)
            total += 4 * n
        return total

    def check_shapes(self, expected: Mapping[str, tuple[int, ...]], where: str) -> None:
        """Every expected tensor present with its shape; LitedgeError naming the first mismatches."""
        have = set(self.keys())
        missing = [k for k in expected if k not in have]
        wrong = [(k, self.shape(k), tuple(s)) for k, s in expected.items() if k in have and tuple(self.shape(k)) != tuple(s)]
        if missing:
            raise LitedgeError(
                f"{where}: {len(missing)} weight(s) the config needs are missing, e.g. {', '.join(missing[:3])}; "
                "the checkpoint does not match its config.json"
            )
        if wrong:
            k, got, want = wrong[0]
            raise LitedgeError(
                f"{where}: {len(wrong)} weight(s) have shapes that disagree with config.json, e.g. {k} is "
                f"{list(got)}, expected {list(want)}: the shard belongs to another model"
            )


class ModuleWeights(WeightSource):
    """The parameters and buffers of an in-memory module, by ``state_dict`` name."""

    def __init__(self, module: nn.Module) -> None:
        self._tensors = dict(module.state_dict(keep_vars=True))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key].detach()
        return t.float() if t.is_floating_point() else t


class SafetensorsWeights(WeightSource):
    """The safetensors weights of one model folder, read lazily: a single file or an index of shards.

    Args:
        directory: a diffusers or transformers model folder (``config.json`` beside
            ``diffusion_pytorch_model[-0000k-of-0000n].safetensors`` or ``model[...].safetensors``).

    Raises:
        LitedgeError: no weights, a truncated or garbage index, a shard the index names that
            is missing or unreadable, a path that leaves the folder.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._where: dict[str, tuple[Path, tuple[int, ...], str, int, int]] = {}
        for path in self._files():
            for key, (shape, dtype, begin, end) in _header(path).items():
                self._where[key] = (path, shape, dtype, begin, end)

    def _files(self) -> list[Path]:
        for stem in WEIGHT_FILE_STEMS:
            index = self.directory / f"{stem}.safetensors.index.json"
            if index.is_file():
                return self._shards(index)
            single = self.directory / f"{stem}.safetensors"
            if single.is_file():
                return [single]
        raise LitedgeError(
            f"{self.directory}: no safetensors weights (expected diffusion_pytorch_model.safetensors, model.safetensors "
            "or a *.safetensors.index.json of shards)"
        )

    def _shards(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
            names = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise LitedgeError(
                f"{index}: not a readable shard index ({type(exc).__name__}: {exc}); the download was cut short: fetch it again"
            ) from None
        shards = [_inside(self.directory, n) for n in names]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise LitedgeError(
                f"{index.name} names {len(missing)} shard(s) that are not in {self.directory}: {', '.join(missing[:3])}; "
                "download every shard"
            )
        return shards

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][1]

    def get(self, key: str) -> torch.Tensor:
        # Read the tensor's bytes, not a memory map: mapped pages would stay resident (and count in
        # RSS) for the whole export, where this holds one tensor at a time.
        path, shape, dtype, begin, end = self._where[key]
        if dtype not in _DTYPES:
            raise LitedgeError(f"{path}: tensor {key} has dtype {dtype}, which litedge does not read")
        buf = bytearray(end - begin)
        try:
            with open(path, "rb") as f:
                f.seek(begin)
                if f.readinto(buf) != len(buf):
                    raise OSError("short read")
        except OSError as exc:
            raise LitedgeError(f"{path}: tensor {key} cannot be read ({exc}): the shard is truncated; fetch it again") from None
        t = torch.frombuffer(buf, dtype=_DTYPES[dtype]) if buf else torch.empty(0, dtype=_DTYPES[dtype])
        t = t.reshape(shape)
        return t.float() if t.is_floating_point() else t.clone()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """Tensor name -> (shape, dtype code, start, end byte in the file) from a safetensors header, checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} does not fit the {size}-byte file")
            header = json.loads(f.read(n))
        entries, end = {}, 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = (8 + n + int(o) for o in info["data_offsets"])
            entries[key] = (tuple(int(d) for d in info["shape"]), str(info["dtype"]), begin, stop)
            end = max(end, stop)
        if end > size:
            raise ValueError(f"tensors end at byte {end} but the file has {size}")
        return entries
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LitedgeError(f"{path}: not a complete safetensors file ({exc}); it was cut short: fetch it again") from None


def _inside(directory: Path, relative: str) -> Path:
    path = (directory / relative).resolve()
    if directory.resolve() not in path.parents:
        raise LitedgeError(f"{relative!r} in {directory} points outside the model directory: refused")
    return path


# ----------------------------------------------------------------------------- skeletons


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory); buffers stay real.

    Each parameter is allocated by its layer, then moved to meta as it is registered, so at
    most one uninitialised parameter exists at a time (and its pages are never touched).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _placeholder(shape: torch.Size) -> nn.Parameter:
    """fp32 zeros of ``shape`` in one element of memory (stride 0)."""
    return nn.Parameter(torch.zeros((), dtype=torch.float32).expand(shape), requires_grad=False)


def placeholder_parameters(module: nn.Module) -> nn.Module:
    """Replace every meta (or real) parameter by stride-0 fp32 zeros of its shape, in place; returns ``module``.

    Parameters shared by several modules stay shared. A placeholder model traces like the
    real one (shapes and ops are the same) at the memory cost of its activations.
    """
    done: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = _placeholder(param.shape)
            sub._parameters[name] = done[id(param)]
    return module


def parameter_aliases(module: nn.Module) -> dict[str, list[str]]:
    """First name of each parameter -> every name it has (tied weights, e.g. T5's shared embedding)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def lookup(source: WeightSource, names: list[str]) -> str | None:
    """The first of ``names`` (aliases of one tensor) that ``source`` holds."""
    return next((n for n in names if n in source), None)


@contextlib.contextmanager
def streamed_weights(module: nn.Module, source: WeightSource, *, key_of: Callable[[str], list[str]] | None = None,
                     transform: Transform | None = None,
                     buffers: Mapping[str, Callable[[], torch.Tensor]] | None = None) -> Iterator[None]:
    """Run ``module`` with real weights read from ``source`` one submodule at a time.

    Each submodule's own parameters are read right before its forward and replaced by
    placeholders right after; a parameter used outside its module's forward must belong to
    an enclosing module that is running (PixArt's ``scale_shift_table``: the model's own).

    Args:
        key_of: a parameter's name in ``module`` -> candidate keys in ``source`` (default:
            the name itself); tied aliases are tried too.
        transform: ``transform(name, tensor)`` alters a tensor as it is read (e.g. to its
            dequantized int4 value), ``name`` being its name in ``module``.
        buffers: buffers computed from weights (name in ``module`` -> value), set the same way.

    Raises:
        LitedgeError: a parameter ``source`` does not hold.
    """
    key_of = key_of or (lambda name: [name])
    aliases = {n: names for names in parameter_aliases(module).values() for n in names}
    buffers = dict(buffers or {})
    owners: list[tuple[nn.Module, dict[str, str], dict[str, str]]] = []
    for mod_name, sub in module.named_modules():
        full = (lambda n, m=mod_name: f"{m}.{n}" if m else n)
        own = {p: full(p) for p, v in sub._parameters.items() if v is not None}
        own_buffers = {b: full(b) for b in sub._buffers if full(b) in buffers}
        if own or own_buffers:
            owners.append((sub, own, own_buffers))
    saved = {id(sub): (dict(sub._parameters), dict(sub._buffers)) for sub, _, _ in owners}

    def value(name: str, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = read()
        return transform(name, t) if transform is not None else t

    def read_param(name: str) -> torch.Tensor:
        candidates = [k for a in aliases.get(name, [name]) for k in key_of(a)]
        key = lookup(source, candidates)
        if key is None:
            raise LitedgeError(f"the weights have no tensor for parameter {candidates[0]}: the checkpoint is incomplete")
        return source.get(key)

    def load(sub: nn.Module, own: dict[str, str], own_buffers: dict[str, str]) -> None:
        for p, name in own.items():
            name = aliases.get(name, [name])[0]  # a tied weight by its first name, as the traced graph names it
            sub._parameters[p] = nn.Parameter(value(name, lambda name=name: read_param(name)), requires_grad=False)
        for b, name in own_buffers.items():
            sub._buffers[b] = value(name, buffers[name])

    def release(sub: nn.Module) -> None:
        params, bufs = saved[id(sub)]
        sub._parameters.update(params)
        sub._buffers.update(bufs)

    handles = []
    for sub, own, own_buffers in owners:
        handles.append(sub.register_forward_pre_hook(lambda m, args, o=own, b=own_buffers: load(m, o, b)))
        handles.append(sub.register_forward_hook(lambda m, args, out: release(m), always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for sub, _, _ in owners:
            release(sub)


def materialize(module: nn.Module, source: WeightSource, *, key_of: Callable[[str], list[str]] | None = None) -> nn.Module:
    """Load every parameter of a skeleton from ``source`` (fp32), in place; returns ``module``.

    For backends that need the whole model in memory (fp16, QNN, Core ML exports).

    Raises:
        LitedgeError: a parameter ``source`` lacks, or one whose shape differs.
    """
    key_of = key_of or (lambda name: [name])
    for first, names in parameter_aliases(module).items():
        key = lookup(source, [k for n in names for k in key_of(n)])
        if key is None:
            raise LitedgeError(f"the weights have no tensor for parameter {first}: the checkpoint is incomplete")
        owner_name, _, pname = first.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = owner._parameters[pname]
        value = source.get(key)
        if tuple(value.shape) != tuple(current.shape):
            raise LitedgeError(f"{key} has shape {list(value.shape)}, the config expects {list(current.shape)}")
        param = nn.Parameter(value, requires_grad=False)
        for n in names:  # tied names keep sharing one tensor
            o_name, _, p = n.rpartition(".")
            (module.get_submodule(o_name) if o_name else module)._parameters[p] = param
    return module
