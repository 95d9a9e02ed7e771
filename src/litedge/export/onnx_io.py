"""Saving ONNX models as one ``.onnx`` file, or ``.onnx`` + one ``.onnx.data`` file (torch-free).

Protobuf cannot serialize a message over 2 GB, so larger models keep their weights in an
external data file next to the graph. litedge always writes at most these two files, named
after the model (``transformer.onnx``, ``transformer.onnx.data``), so a bundle lists them
and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # bytes of weights above which they go to a .data file
_MIN_EXTERNAL_TENSOR = 1024  # smaller tensors stay in the graph file
_ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map weights


def data_path_for(path: Path) -> Path:
    """Where the external data of ``path`` lives: ``NAME.onnx.data`` beside it."""
    return path.with_name(path.name + ".data")


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model: initializers and node attributes (``Constant``), subgraphs too.

    torch's exporter stores both kinds externally past 2 GB.
    """
    return list(_graph_tensors(model.graph))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, inline or external."""
    total = 0
    for t in _tensors(model):
        if uses_external_data(t):
            total += int(ExternalDataInfo(t).length or 0)
        else:
            total += len(t.raw_data)
    return total


def _read_external(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    info = ExternalDataInfo(tensor)
    source = (base_dir / info.location).resolve()
    if base_dir.resolve() not in source.parents:
        raise ValueError(f"external data {info.location!r} of {tensor.name!r} points outside {base_dir}")
    with open(source, "rb") as f:
        f.seek(int(info.offset or 0))
        return f.read(int(info.length)) if info.length is not None else f.read()


def save_onnx(model: onnx.ModelProto, path: Path, *, base_dir: Path | None = None, external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` (+ ``path.data`` when external); returns the files written.

    Args:
        model: the graph; tensors already stored externally are read from ``base_dir``
            (the directory of the file it was loaded from with ``load_external_data=False``)
            one at a time, so a model larger than memory can be re-saved.
        path: the ``.onnx`` file to write. A stale ``.onnx.data`` beside it is removed.
        external: True / False to force; None: external when the weights pass
            :data:`EXTERNAL_DATA_THRESHOLD` (about 2 GB) or already were.
    """
    path = Path(path)
    data_path = data_path_for(path)
    already = any(uses_external_data(t) for t in _tensors(model))
    if already and base_dir is None:
        raise ValueError("model has external data: pass base_dir, the directory it was loaded from")
    if external is None:
        external = already or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmp_data = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
    if external:
        with open(tmp_data, "wb") as out:
            for t in _tensors(model):
                if uses_external_data(t):
                    blob = _read_external(t, base_dir)
                elif t.HasField("raw_data") and len(t.raw_data) >= _MIN_EXTERNAL_TENSOR:
                    blob = t.raw_data
                else:
                    continue
                out.write(b"\0" * (-out.tell() % _ALIGN))
                offset = out.tell()
                out.write(blob)
                t.raw_data = b""  # set_external_data needs the field present; it is cleared below
                set_external_data(t, location=data_path.name, offset=offset, length=len(blob))
                t.ClearField("raw_data")
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    onnx.save_model(model, str(tmp_path))
    if external:
        os.replace(tmp_data, data_path)
    elif data_path.exists():
        data_path.unlink()
    os.replace(tmp_path, path)
    return [path, data_path] if external else [path]


def model_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and every external data file it references (without loading weights)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({ExternalDataInfo(t).location for t in _tensors(model) if uses_external_data(t)})
    return [path, *(path.parent / loc for loc in locations)]


def file_bytes(path: Path) -> int:
    """Size on disk of a model: the graph file plus its external data files."""
    return sum(p.stat().st_size for p in model_files(path))


def cpu_session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path`` (warnings and errors logged only)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """``max_abs_err`` and ``rel_err`` (max abs error / max abs reference) of two arrays."""
    if not ref.size:
        return {"max_abs_err": 0.0, "rel_err": 0.0}
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    return {"max_abs_err": err, "rel_err": err / max(float(np.max(np.abs(ref))), 1e-12)}
