"""The bundle: the one contract between export and runtime (torch-free).

A bundle is a directory ``NAME.litedge/`` holding ``manifest.json`` and the files it
names. The manifest is written last, after every file it names is complete, and carries
each file's sha256; a directory without a valid manifest is not a bundle. Paths in it are
relative and never leave the directory (docs/design.md, "The bundle").

Writing (export side)::

    from litedge.bundle import BundleWriter
    with BundleWriter("out/tiny.litedge", force=True) as w:
        (w.path / "transformer.onnx").write_bytes(onnx_bytes)
        w.add_component("transformer", "transformer.onnx",
                        inputs={"sample": {"dtype": "float32", "shape": ["batch", 4, "h", "w"]}})
        w.set(model={"family": "lit"}, target={"name": "cpu", "format": "onnx"})
    # out/tiny.litedge now exists, complete, or not at all.

Reading (runtime side)::

    from litedge.bundle import verify_bundle, resolve_path
    manifest = verify_bundle("out/tiny.litedge")          # structure, paths, sha256
    path = resolve_path("out/tiny.litedge", manifest.components["transformer"].file)

This module imports only the standard library.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from litedge import __version__
from litedge.atomic import recover_interrupted
from litedge.errors import LitedgeError
from litedge.safe_write import fsync_dir, temp_name, write_text

FORMAT = "litedge-bundle"
VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is a few KiB; refuse to parse a huge one
CHUNK_BYTES = 2**20  # streaming hash chunk

DTYPES = frozenset(
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint64 uint32 uint16 uint8 bool string".split()
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STALE = re.compile(r"\..+\.(?:tmp|old)-(?:\d+-)?[0-9a-f]{16}")
_FIX = "the manifest is corrupt or was edited by hand; re-export the bundle"

StrPath = str | os.PathLike


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Component:
    """One file (or directory, e.g. an ``.mlpackage``) of the pipeline and its interface.

    Attributes:
        file: path relative to the bundle root, ``/``-separated.
        sha256: hex digest from :func:`file_sha256`.
        inputs, outputs: tensor name -> ``{"dtype": "float32", "shape": ["batch", 4, "h", "w"]}``;
            an int dimension is fixed, a str one symbolic.
        shapes: ``"dynamic"``, or the static buckets ``[[height, width], ...]`` in pixels.
        extra_files: files the component needs beside ``file`` (ONNX external data,
            EPContext binaries): ``[{"file": ..., "sha256": ...}]``.
        meta: anything target specific (quantization report, precision...).
    """

    file: str
    sha256: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    shapes: str | list[list[int]] = "dynamic"
    extra_files: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest's form; empty optional fields are left out."""
        out: dict[str, Any] = {"file": self.file, "sha256": self.sha256}
        for key in ("inputs", "outputs"):
            if getattr(self, key):
                out[key] = copy.deepcopy(getattr(self, key))
        out["shapes"] = copy.deepcopy(self.shapes)
        for key in ("extra_files", "meta"):
            if getattr(self, key):
                out[key] = copy.deepcopy(getattr(self, key))
        return out


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``; ``version`` is the layout :meth:`to_json` writes."""

    model: dict[str, Any]
    target: dict[str, Any]
    components: dict[str, Component]
    tokenizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    created_by: str = f"litedge {__version__}"
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (deep copies, safe to mutate)."""
        return {
            "format": self.format,
            "version": self.version,
            "model": copy.deepcopy(self.model),
            "target": copy.deepcopy(self.target),
            "components": {name: c.to_json() for name, c in self.components.items()},
            "tokenizer": copy.deepcopy(self.tokenizer),
            "scheduler": copy.deepcopy(self.scheduler),
            "defaults": copy.deepcopy(self.defaults),
            "fidelity": copy.deepcopy(self.fidelity),
            "created_by": self.created_by,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate a manifest object of any version this litedge reads."""
        return _parse(data, "manifest")


# ----------------------------------------------------------------------------- paths and hashes


def _check_relpath(relpath: Any, where: str) -> str:
    """Lexical checks of a bundle path; returns it normalized (``a/./b`` -> ``a/b``)."""
    def bad(problem: str) -> LitedgeError:
        return LitedgeError(
            f"{where}: path {relpath!r} {problem}; paths in a bundle are relative, '/'-separated "
            "and stay inside it; re-export the bundle")

    if not isinstance(relpath, str) or not relpath:
        raise bad("is not a non-empty string")
    if "\\" in relpath or "\0" in relpath:
        raise bad("contains a backslash or NUL")
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or PureWindowsPath(relpath).drive:
        raise bad("is absolute")
    if ".." in pure.parts:
        raise bad("leaves the bundle ('..')")
    if str(pure) == ".":
        raise bad("names the bundle directory itself")
    return str(pure)


def resolve_path(bundle_dir: StrPath, relpath: str) -> Path:
    """The real path of ``relpath`` inside ``bundle_dir``, symlinks resolved.

    Raises:
        LitedgeError: ``relpath`` is absolute, contains ``..``, or a symlink on the way
            leads outside the bundle.
    """
    rel = _check_relpath(relpath, str(bundle_dir))
    root = Path(bundle_dir).resolve()
    try:
        target = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # symlink loop
        raise LitedgeError(f"{bundle_dir}: path {relpath!r} cannot be resolved ({e}); "
                           "re-export the bundle") from None
    if root not in target.parents:
        raise LitedgeError(
            f"{bundle_dir}: path {relpath!r} is a symlink that leads to {target}, outside the "
            "bundle; bundles hold their own files; re-export the bundle")
    return target


def _stream_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _tree_files(root: Path) -> list[str]:
    """Sorted ``/``-separated paths of the regular files under ``root``; refuses links and specials."""
    def fail(e: OSError) -> None:
        raise e

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise LitedgeError(f"{full}: a symlink inside a directory component; bundles hold "
                                   "regular files only; replace it with a copy of its target")
            if stat.S_ISREG(mode):
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
            elif not stat.S_ISDIR(mode):
                raise LitedgeError(f"{full}: not a regular file; bundles hold regular files only")
    return sorted(found)


def file_sha256(path: StrPath) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks.

    For a directory (an ``.mlpackage``), the digest of one line per regular file in sorted
    order: ``relative/path NUL sha256-hex LF``, after the header ``litedge-dir-v1 LF``.
    Empty directories do not count; symlinks and special files inside are refused.
    """
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256(b"litedge-dir-v1\n")
        for rel in _tree_files(p):
            line = rel.encode("utf-8", "surrogateescape") + b"\0" + _stream_sha256(p / rel).encode() + b"\n"
            digest.update(line)
        return digest.hexdigest()
    if not p.is_file():
        raise LitedgeError(f"{p}: not a regular file or directory (missing, or a device/FIFO); "
                           "expected a file written by lit-export; re-export the bundle")
    return _stream_sha256(p)


# ----------------------------------------------------------------------------- reading


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _want(cond: bool, source: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise LitedgeError(f"{source}: '{key}' must be {expected}, got {_short(got)}; {_FIX}")


def _dict(value: Any, source: str, key: str) -> dict[str, Any]:
    _want(isinstance(value, dict), source, key, "a JSON object", value)
    return copy.deepcopy(value)


def _only_keys(data: dict, allowed: Iterable[str], source: str, where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise LitedgeError(
            f"{source}: unknown key {unknown[0]!r} in {where} (format version {VERSION} has "
            f"{', '.join(sorted(allowed))}); re-export with this litedge, or upgrade litedge "
            "if a newer one wrote it")


def _sha(value: Any, source: str, key: str) -> str:
    _want(isinstance(value, str) and _SHA256.fullmatch(value) is not None, source, key,
          "64 lowercase hex digits (sha256)", value)
    return value


def _relpath(value: Any, source: str, key: str) -> str:
    rel = _check_relpath(value, f"{source}: '{key}'")
    if rel in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
        raise LitedgeError(f"{source}: '{key}' names the manifest itself; {_FIX}")
    return rel


def _tensors(value: Any, source: str, key: str) -> dict[str, dict[str, Any]]:
    tensors = _dict(value, source, key)
    for name, spec in tensors.items():
        where = f"{key}.{name}"
        _want(isinstance(spec, dict) and {"dtype", "shape"} <= set(spec), source, where,
              'an object with "dtype" and "shape"', spec)
        _want(spec["dtype"] in DTYPES, source, f"{where}.dtype", f"one of {sorted(DTYPES)}", spec["dtype"])
        shape = spec["shape"]
        _want(isinstance(shape, list) and all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d)
            for d in shape), source, f"{where}.shape", "a list of positive ints and symbolic names", shape)
    return tensors


def _shapes(value: Any, source: str, key: str) -> str | list[list[int]]:
    if value == "dynamic":
        return value
    ok = isinstance(value, list) and value and all(
        isinstance(hw, list) and len(hw) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in hw) for hw in value)
    _want(bool(ok), source, key, '"dynamic" or a non-empty list of [height, width] in pixels', value)
    _want(len({tuple(hw) for hw in value}) == len(value), source, key, "buckets without repeats", value)
    return copy.deepcopy(value)


def _extra_files(value: Any, source: str, key: str) -> list[dict[str, str]]:
    _want(isinstance(value, list), source, key, 'a list of {"file", "sha256"} objects', value)
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        _want(isinstance(item, dict) and set(item) == {"file", "sha256"}, source, where,
              'an object with exactly "file" and "sha256"', item)
        out.append({"file": _relpath(item["file"], source, f"{where}.file"),
                    "sha256": _sha(item["sha256"], source, f"{where}.sha256")})
    return out


# ----------------------------------------------------------------------------- field types and ranges
# The bounds the reader enforces; lit-export checks what it writes against the same ones.

MAX_TEXT_LENGTH = 4096  # prompt tokens (PixArt-Sigma 300, SD3 256 + 77)
MAX_STEPS = 1000  # denoising steps (the training schedules have 1000 timesteps)
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (used: 1-20); beyond it float32 images saturate
MAX_IMAGE_SIDE = 16384  # pixels


@dataclass(frozen=True)
class Field:
    """What a manifest field may hold: ``kind`` "int", "number", "bool", "str", "strs", "ints" (a non-empty
    list of integers, each in the range), and a closed range."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        what = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
                "strs": "a list of strings", "ints": "a non-empty list of integers"}[self.kind]
        if self.choices:
            return f"one of {', '.join(map(repr, self.choices))}"
        if self.kind == "ints" and self.low is not None and self.high is not None:
            return f"{what}, each in [{self.low:g}, {self.high:g}]"
        if self.low is not None and self.high is not None:
            return f"{what} in [{self.low:g}, {self.high:g}]"
        return what

    def ok(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "strs":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        if self.kind == "ints":
            item = Field("int", self.low, self.high)
            return isinstance(value, list) and bool(value) and all(item.ok(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


MODEL_FIELDS: dict[str, Field] = {
    "family": Field("str"), "task": Field("str"), "base": Field("str"),
    "latent_channels": Field("int", 1, 1024),
    "patch_size": Field("int", 1, 64),
    "sample_size": Field("int", 1, 4096),
    "vae_scale_factor": Field("int", 1, 64),
    "vae_scaling_factor": Field("number", 1e-6, 1e6),
    "prediction_type": Field("str", choices=("epsilon", "v_prediction", "sample", "flow")),
    "learned_sigma": Field("bool"),
    "text_max_length": Field("int", 0, MAX_TEXT_LENGTH),
    "num_classes": Field("int", 1, 1_000_000),
    "clip_max_length": Field("int", 1, MAX_TEXT_LENGTH),
    "joint_attention_dim": Field("int", 1, 65536),
    "trained_sizes": Field("ints", 1, MAX_IMAGE_SIDE),  # square image sides (px) the model was trained at
    "native_size": Field("int", 1, MAX_IMAGE_SIDE),  # what lit-generate makes when not told (px, square)
}
TARGET_FIELDS: dict[str, Field] = {
    "name": Field("str"), "format": Field("str"), "providers": Field("strs"),
    "precision": Field("str"), "weights": Field("str"),
}
DEFAULTS_FIELDS: dict[str, Field] = {
    "steps": Field("int", 1, MAX_STEPS),
    "guidance_scale": Field("number", 0, MAX_GUIDANCE),
    "height": Field("int", 1, MAX_IMAGE_SIDE),
    "width": Field("int", 1, MAX_IMAGE_SIDE),
}


def _checked_fields(section: dict[str, Any], fields: dict[str, Field], source: str, key: str) -> dict[str, Any]:
    """Every known field of ``section`` has its type and range (unknown fields are extensions, kept)."""
    for name, spec in fields.items():
        if name in section:
            _want(spec.ok(section[name]), source, f"{key}.{name}", spec.describe(), section[name])
    return section


def _scheduler_v1(value: Any, source: str) -> dict[str, Any]:
    scheduler = _dict(value, source, "scheduler")
    if "type" in scheduler:
        _want(isinstance(scheduler["type"], str), source, "scheduler.type", "a string", scheduler["type"])
    if "config" in scheduler:
        _dict(scheduler["config"], source, "scheduler.config")
    return scheduler


_V1_KEYS = ("format", "version", "model", "target", "components", "tokenizer", "scheduler",
            "defaults", "fidelity", "created_by")
_V1_COMPONENT_KEYS = ("file", "sha256", "inputs", "outputs", "shapes", "extra_files", "meta")


def _component_v1(name: str, value: Any, source: str) -> Component:
    where = f"components.{name}"
    data = _dict(value, source, where)
    _only_keys(data, _V1_COMPONENT_KEYS, source, where)
    for key in ("file", "sha256"):
        if key not in data:
            raise LitedgeError(f"{source}: {where} has no '{key}'; {_FIX}")
    return Component(
        file=_relpath(data["file"], source, f"{where}.file"),
        sha256=_sha(data["sha256"], source, f"{where}.sha256"),
        inputs=_tensors(data.get("inputs", {}), source, f"{where}.inputs"),
        outputs=_tensors(data.get("outputs", {}), source, f"{where}.outputs"),
        shapes=_shapes(data.get("shapes", "dynamic"), source, f"{where}.shapes"),
        extra_files=_extra_files(data.get("extra_files", []), source, f"{where}.extra_files"),
        meta=_dict(data.get("meta", {}), source, f"{where}.meta"),
    )


def _tokenizer_v1(value: Any, source: str, key: str) -> dict[str, Any]:
    """A tokenizer entry ``{"kind", "path", "sha256", ...}``; ``path`` and ``sha256`` checked when present."""
    tokenizer = _dict(value, source, key)
    if "path" in tokenizer:
        tokenizer["path"] = _relpath(tokenizer["path"], source, f"{key}.path")
    if "sha256" in tokenizer:
        _sha(tokenizer["sha256"], source, f"{key}.sha256")
    return tokenizer


def tokenizer_entries(tokenizer: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every tokenizer a manifest's ``tokenizer`` section names, by key: ``"tokenizer"`` for the
    main entry, then the keys of its ``extra`` mapping (SD3: ``tokenizer_2``, ``tokenizer_3``)."""
    if not tokenizer:
        return {}
    main = {k: v for k, v in tokenizer.items() if k != "extra"}
    return {"tokenizer": main, **tokenizer.get("extra", {})}


def _read_v1(data: dict[str, Any], source: str) -> Manifest:
    """Format version 1: the layout in docs/design.md."""
    _only_keys(data, _V1_KEYS, source, "the manifest")
    for key in ("model", "target", "components"):
        if key not in data:
            raise LitedgeError(f"{source}: no '{key}'; {_FIX}")
    components = _dict(data["components"], source, "components")
    _want(bool(components), source, "components", "a non-empty object", components)
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _tokenizer_v1(tokenizer, source, "tokenizer")
        extra = _dict(tokenizer.get("extra", {}), source, "tokenizer.extra")
        for name, value in extra.items():
            _want(isinstance(value, dict) and "extra" not in value, source, f"tokenizer.extra.{name}",
                  'a tokenizer object {"kind", "path", "sha256"}', value)
            extra[name] = _tokenizer_v1(value, source, f"tokenizer.extra.{name}")
        if "extra" in tokenizer:
            tokenizer["extra"] = extra
    created_by = data.get("created_by", "unknown")
    _want(isinstance(created_by, str), source, "created_by", "a string", created_by)
    return Manifest(
        model=_checked_fields(_dict(data["model"], source, "model"), MODEL_FIELDS, source, "model"),
        target=_checked_fields(_dict(data["target"], source, "target"), TARGET_FIELDS, source, "target"),
        components={name: _component_v1(name, value, source) for name, value in components.items()},
        tokenizer=tokenizer,
        scheduler=_scheduler_v1(data.get("scheduler", {}), source),
        defaults=_checked_fields(_dict(data.get("defaults", {}), source, "defaults"), DEFAULTS_FIELDS,
                                 source, "defaults"),
        fidelity=_dict(data.get("fidelity", {}), source, "fidelity"),
        created_by=created_by,
    )


# One reader per format version; each returns the current Manifest. Add v2 beside v1.
_READERS: dict[int, Callable[[dict[str, Any], str], Manifest]] = {1: _read_v1}


def _parse(data: Any, source: str) -> Manifest:
    if not isinstance(data, dict):
        raise LitedgeError(f"{source}: expected a JSON object, got {type(data).__name__}; {_FIX}")
    if data.get("format") != FORMAT:
        raise LitedgeError(f"{source}: format is {_short(data.get('format'))}, expected {FORMAT!r}; "
                           "this is not a litedge bundle manifest; export one with lit-export")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise LitedgeError(f"{source}: 'version' must be an integer, got {_short(version)}; {_FIX}")
    reader = _READERS.get(version)
    if reader is None:
        fix = ("upgrade litedge, or re-export the bundle with this one" if version > max(_READERS)
               else "re-export the bundle with this litedge")
        raise LitedgeError(f"{source}: bundle format version {version}, but litedge {__version__} "
                           f"reads versions {sorted(_READERS)}; {fix}")
    return reader(data, source)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_manifest(bundle_dir: StrPath) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json`` (structure and paths, not hashes).

    Raises:
        LitedgeError: not a bundle (no manifest), not JSON, wrong format, a version this
            litedge does not read, or a malformed field.
    """
    root = Path(bundle_dir)
    where = root / MANIFEST_NAME
    if not root.is_dir():
        raise LitedgeError(f"{root}: not a litedge bundle (no such directory); expected a "
                           "NAME.litedge directory written by lit-export; check the path")
    if not where.exists() and not where.is_symlink():
        raise LitedgeError(f"{root}: not a litedge bundle (no {MANIFEST_NAME}); it is not a bundle, "
                           "or its export was interrupted; re-export it")
    path = resolve_path(root, MANIFEST_NAME)
    if not path.is_file():
        raise LitedgeError(f"{where}: not a regular file; {_FIX}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise LitedgeError(f"{where}: {path.stat().st_size} bytes, expected at most "
                               f"{MAX_MANIFEST_BYTES}; {_FIX}")
        raw = path.read_bytes()
    except OSError as e:
        raise LitedgeError(f"{where}: cannot read ({e.strerror}); check its permissions") from None
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LitedgeError(f"{where}: not valid JSON ({_short(str(e))}); {_FIX}") from None
    return _parse(data, str(where))


def _named_files(manifest: Manifest) -> Iterator[tuple[str, str, str | None]]:
    """(owner, relative path, sha256 or None) of every file the manifest names."""
    for name, comp in manifest.components.items():
        yield f"component '{name}'", comp.file, comp.sha256
        for extra in comp.extra_files:
            yield f"component '{name}'", extra["file"], extra["sha256"]
    for key, entry in tokenizer_entries(manifest.tokenizer).items():
        if "path" in entry:
            yield key, entry["path"], entry.get("sha256")


def _refuse_unlisted(root: Path, manifest: Manifest) -> None:
    """Every file in the bundle is the manifest, a named file, or inside a named directory.

    A file nobody lists is never hashed, so a graph could read it unchecked (an ONNX
    external-data file the manifest does not name): it is refused, as safetensors refuses
    bytes its header does not account for.
    """
    named = {MANIFEST_NAME} | {str(PurePosixPath(rel)) for _, rel, _ in _named_files(manifest)}
    try:
        files = _walk_names(root)
    except OSError as e:
        raise LitedgeError(f"{root}: cannot list the bundle ({e.strerror}); check its permissions") from None
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not any("/".join(parts[:i]) in named for i in range(1, len(parts) + 1)):
            raise LitedgeError(
                f"{root}/{rel}: in the bundle but not listed in its manifest (no sha256 covers it, and a graph "
                "could read it unchecked); the bundle was modified: remove the file or re-export the bundle")


def _walk_names(root: Path) -> list[str]:
    """``/``-separated paths of every non-directory entry under ``root`` (links not followed)."""
    def fail(e: OSError) -> None:
        raise e

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
        dirnames[:] = [d for d in dirnames if d not in links]
    return sorted(out)


def verify_bundle(bundle_dir: StrPath, manifest: Manifest | None = None,
                  check_hashes: bool = True) -> Manifest:
    """Check that every file the manifest names exists, stays inside, and matches its sha256.

    Args:
        bundle_dir: the ``NAME.litedge`` directory.
        manifest: an already loaded manifest; default :func:`load_manifest` (bundle_dir).
        check_hashes: False checks presence and paths only (fast; no file is read).

    Returns:
        The manifest.

    Raises:
        LitedgeError: naming the first file that is missing, escapes, or mismatches.
    """
    root = Path(bundle_dir)
    manifest = manifest if manifest is not None else load_manifest(root)
    for owner, rel, expected in _named_files(manifest):
        path = resolve_path(root, rel)
        shown = f"{root}/{rel}"
        if not path.exists():
            raise LitedgeError(f"{shown}: missing ({owner} names it); the bundle is incomplete; re-export it")
        if not (path.is_file() or path.is_dir()):
            raise LitedgeError(f"{shown}: not a regular file or directory; {_FIX}")
        if not check_hashes or expected is None:
            continue
        try:
            got = file_sha256(path)
        except OSError as e:
            raise LitedgeError(f"{shown}: cannot read ({e.strerror}); check its permissions") from None
        if got != expected:
            raise LitedgeError(f"{shown}: sha256 mismatch (expected {expected[:12]}…, got {got[:12]}…): "
                               "the bundle is corrupt or was modified; re-export it")
    _refuse_unlisted(root, manifest)
    return manifest


def is_bundle(path: StrPath) -> bool:
    """True if ``path`` has a valid manifest and every file it names exists (hashes not read)."""
    try:
        verify_bundle(path, check_hashes=False)
    except (LitedgeError, OSError):
        return False
    return True


# ----------------------------------------------------------------------------- writing


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (best effort off POSIX)."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath, n) for n in dirnames + filenames]
    for p in paths:
        if not p.is_symlink():
            fsync_dir(p)


def _check_replaceable(out: Path) -> None:
    """--force replaces a bundle (or an empty directory), never an arbitrary folder."""
    if out.is_symlink() or not out.is_dir():
        raise LitedgeError(f"{out} exists and is not a directory; remove it or choose another output path")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise LitedgeError(f"{out} exists and is not a litedge bundle (no {MANIFEST_NAME}); refusing to "
                           "replace it even with --force; remove it yourself or choose another output path")


def _as_rel(value: StrPath, where: str) -> str:
    text = PurePath(value).as_posix() if isinstance(value, os.PathLike) else value
    return _check_relpath(text, where)


class BundleWriter:
    """Write ``NAME.litedge`` atomically: complete at ``out_dir``, or nothing there.

    Files go into a temporary sibling ``.NAME.litedge.tmp-<random>`` (:attr:`path`). On a
    clean exit every named file is hashed and flushed, ``manifest.json`` is written last,
    and the directory is renamed into place (an old bundle, with ``force``, is renamed
    aside first and deleted after). On an exception, KeyboardInterrupt included, the
    temporary directory is deleted. A process killed at any moment leaves at ``out_dir``
    either the old bundle or nothing; a stale temporary can be removed with
    :func:`cleanup_stale_temps`.
    """

    def __init__(self, out_dir: StrPath, force: bool = False) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))
        self.force = force
        self._tmp: Path | None = None
        self._used = False
        self._components: dict[str, dict[str, Any]] = {}
        self._fields: dict[str, Any] = {"model": {}, "target": {}, "tokenizer": None,
                                        "scheduler": {}, "defaults": {}, "fidelity": {}}

    @property
    def path(self) -> Path:
        """The temporary directory to write component files into."""
        if self._tmp is None:
            raise LitedgeError("BundleWriter.path exists only inside 'with BundleWriter(...) as w:'; "
                               "write the files within the with block")
        return self._tmp

    def __enter__(self) -> BundleWriter:
        if self._used:
            raise LitedgeError("a BundleWriter writes one bundle once; create a new BundleWriter")
        self._used = True
        out = self.out_dir
        if not out.name:
            raise LitedgeError(f"{out}: not a bundle path; expected a directory such as out/NAME.litedge")
        if out.parent.is_dir():
            recover_interrupted(out)  # a killed earlier write: old bundle back, dead temporaries gone
        if out.exists() or out.is_symlink():
            if not self.force:
                raise LitedgeError(f"{out} exists; pass --force to overwrite (force=True), "
                                   "or choose another output path")
            _check_replaceable(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LitedgeError(f"cannot create the output folder {out.parent} ({e.strerror}); "
                               "choose an output path in a writable folder") from None
        self._tmp = self._make_temp()
        return self

    def _make_temp(self) -> Path:
        parent = self.out_dir.parent
        while True:
            tmp = parent / temp_name(self.out_dir.name)
            try:
                os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0o700
                return tmp
            except FileExistsError:
                continue
            except OSError as e:
                problem = ("is not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                           else f"refused a temporary directory ({e.strerror})")
                raise LitedgeError(f"{parent} {problem}: cannot write {self.out_dir.name} there; "
                                   "choose an output path in a writable folder or fix its permissions") from None

    def add_component(self, name: str, file: StrPath, *, inputs: dict | None = None,
                      outputs: dict | None = None, shapes: str | list = "dynamic",
                      extra_files: Iterable[StrPath] = (), meta: dict | None = None) -> None:
        """Name a file (or directory) written under :attr:`path`; hashed when the block ends.

        ``inputs``/``outputs``/``shapes``/``meta`` are as in :class:`Component`;
        ``extra_files`` are paths relative to :attr:`path`.
        """
        self.path  # noqa: B018  (raises outside the with block)
        if not isinstance(name, str) or not name:
            raise LitedgeError(f"component name must be a non-empty string, got {_short(name)}")
        if name in self._components:
            raise LitedgeError(f"component {name!r} added twice; give each component one add_component call")
        spec = {"file": _as_rel(file, f"component {name!r}"), "sha256": "0" * 64,
                "inputs": inputs or {}, "outputs": outputs or {}, "shapes": shapes,
                "extra_files": [{"file": _as_rel(f, f"component {name!r} extra file"), "sha256": "0" * 64}
                                for f in extra_files],
                "meta": meta or {}}
        _component_v1(name, spec, f"add_component({name!r})")  # fail here, not at commit
        self._components[name] = copy.deepcopy(spec)

    def set(self, *, model: dict | None = None, target: dict | None = None,
            tokenizer: dict | None = None, scheduler: dict | None = None,
            defaults: dict | None = None, fidelity: dict | None = None) -> None:
        """Merge (shallow ``dict.update``) into the manifest fields; None leaves a field as is."""
        given = {"model": model, "target": target, "tokenizer": tokenizer, "scheduler": scheduler,
                 "defaults": defaults, "fidelity": fidelity}
        for key, value in given.items():
            if value is None:
                continue
            if not isinstance(value, dict):
                raise LitedgeError(f"BundleWriter.set({key}=...) takes a dict, got {type(value).__name__}")
            if self._fields[key] is None:
                self._fields[key] = {}
            self._fields[key].update(copy.deepcopy(value))

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        tmp = self.path
        committed = False
        try:
            if exc_type is None:
                committed = self._commit(tmp)
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None
        return False

    def _hash(self, tmp: Path, rel: str, owner: str) -> str:
        path = resolve_path(tmp, rel)
        if not path.exists():
            raise LitedgeError(f"{rel}: {owner} names it but it was not written; write it under "
                               "writer.path before the with block ends")
        return file_sha256(path)

    def _build_manifest(self, tmp: Path) -> Manifest:
        if not self._components:
            raise LitedgeError("BundleWriter: no components; call add_component() before the with block ends")
        for key in ("model", "target"):
            if not self._fields[key]:
                raise LitedgeError(f"BundleWriter: '{key}' is empty; call set({key}={{...}}) "
                                   "before the with block ends")
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "components": {},
                                "created_by": f"litedge {__version__}", **copy.deepcopy(self._fields)}
        for name, spec in self._components.items():
            owner = f"component {name!r}"
            spec["sha256"] = self._hash(tmp, spec["file"], owner)
            for extra in spec["extra_files"]:
                extra["sha256"] = self._hash(tmp, extra["file"], owner)
            data["components"][name] = {k: v for k, v in spec.items() if v or k in ("file", "sha256")}
        tokenizer = data["tokenizer"]
        for key, entry in ((k, v) for k, v in tokenizer_entries(tokenizer).items() if "path" in v):
            owner = tokenizer if key == "tokenizer" else tokenizer["extra"][key]
            owner["sha256"] = self._hash(tmp, _check_relpath(entry["path"], key), key)
        return _parse(data, "BundleWriter")  # what is written is what the reader accepts

    def _commit(self, tmp: Path) -> bool:
        manifest = self._build_manifest(tmp)
        try:
            text = json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise LitedgeError(f"BundleWriter: the manifest is not JSON-serializable ({e}); "
                               "pass plain str/int/float/list/dict values to set()") from None
        _fsync_tree(tmp)  # every named file is on disk before the manifest names it
        write_text(tmp / MANIFEST_NAME, text, what="manifest")  # temp + fsync + rename + fsync of tmp
        self._move_into_place(tmp)
        return True

    def _move_into_place(self, tmp: Path) -> None:
        out = self.out_dir
        aside = None
        if out.exists() or out.is_symlink():
            if not self.force:
                raise LitedgeError(f"{out} appeared while writing; pass --force to overwrite it, "
                                   "or choose another output path")
            _check_replaceable(out)
            aside = out.parent / temp_name(out.name, "old")
            try:
                os.rename(out, aside)
            except OSError as e:
                raise LitedgeError(f"cannot set the old bundle {out} aside ({e.strerror}); it is unchanged; "
                                   "fix the folder's permissions or choose another output path") from None
        try:
            os.rename(tmp, out)
        except BaseException as e:
            if aside is not None:
                try:
                    os.rename(aside, out)
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise LitedgeError(f"cannot move the finished bundle to {out} ({e.strerror}); "
                                   "remove what is there, or choose another output path") from None
            raise
        fsync_dir(out.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def cleanup_stale_temps(parent: StrPath, max_age_s: float = 24 * 3600) -> list[Path]:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-*`` directories left in ``parent`` by killed writers.

    Only those not modified for ``max_age_s`` seconds go, so a writer still running in the
    same folder keeps its temporary directory. Returns the deleted paths.
    """
    removed = []
    now = time.time()
    with os.scandir(parent) as entries:
        for entry in entries:
            if (_STALE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
                    and now - entry.stat(follow_symlinks=False).st_mtime > max_age_s):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed
