"""Malicious or broken bundles, generated in tmp dirs: every one is refused with a LitedgeError.

Each case starts from a valid bundle and changes one thing, the way safetensors' attacks/
folder does for its files: path traversal, escaping symlinks, special files, oversized or
ambiguous JSON, type confusion in the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from litedge.bundle import MANIFEST_NAME, MAX_MANIFEST_BYTES, is_bundle, load_manifest, verify_bundle
from litedge.errors import LitedgeError
from tests.test_bundle import edit_manifest, write_bundle


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "x.litedge")


def refused(bundle: Path, match: str, structural: bool = True) -> None:
    """verify_bundle refuses it in one line; so does is_bundle, unless only a hash tells."""
    with pytest.raises(LitedgeError, match=match) as info:
        verify_bundle(bundle)
    assert "\n" not in str(info.value)
    assert is_bundle(bundle) is not structural


def transformer(**fields):
    return lambda d: d["components"]["transformer"].update(fields)


MANIFEST_EDITS = {
    "dotdot": (transformer(file="../evil.onnx"), "leaves the bundle"),
    "dotdot_inner": (transformer(file="sub/../../evil.onnx"), "leaves the bundle"),
    "absolute": (transformer(file="/etc/passwd"), "is absolute"),
    "windows_drive": (transformer(file="C:/Windows/evil.onnx"), "is absolute"),
    "backslash": (transformer(file="..\\evil.onnx"), "backslash"),
    "nul": (transformer(file="a\0.onnx"), "NUL"),
    "bundle_root": (transformer(file="."), "bundle directory itself"),
    "empty_path": (transformer(file=""), "non-empty string"),
    "path_not_str": (transformer(file=["a"]), "non-empty string"),
    "names_manifest": (transformer(file=MANIFEST_NAME), "names the manifest"),
    "extra_dotdot": (transformer(extra_files=[{"file": "../x", "sha256": "0" * 64}]), "leaves the bundle"),
    "tokenizer_dotdot": (lambda d: d["tokenizer"].update(path="../../home"), "leaves the bundle"),
    "tokenizer_extra_dotdot": (lambda d: d["tokenizer"].update(extra={"tokenizer_2": {"path": "../../home"}}),
                               "leaves the bundle"),
    "tokenizer_extra_not_object": (lambda d: d["tokenizer"].update(extra={"tokenizer_2": "tok"}), "tokenizer object"),
    "tokenizer_extra_bad_sha": (lambda d: d["tokenizer"].update(extra={"tokenizer_2": {"path": "tokenizer",
                                                                                     "sha256": "ab"}}),
                                "64 lowercase hex"),
    "sha_not_hex": (transformer(sha256="z" * 64), "64 lowercase hex"),
    "sha_short": (transformer(sha256="ab12"), "64 lowercase hex"),
    "unknown_component_key": (transformer(files=["x"]), "unknown key 'files'"),
    "unknown_top_key": (lambda d: d.update(exec="rm -rf /"), "unknown key 'exec'"),
    "version_bool": (lambda d: d.update(version=True), "must be an integer"),
    "version_str": (lambda d: d.update(version="1"), "must be an integer"),
    "components_empty": (lambda d: d.update(components={}), "non-empty object"),
    "components_list": (lambda d: d.update(components=[]), "JSON object"),
    "model_missing": (lambda d: d.pop("model"), "no 'model'"),
    "shape_bool": (transformer(inputs={"x": {"dtype": "float32", "shape": [True]}}), "positive ints"),
    "shapes_bucket_bad": (transformer(shapes=[[512, -1]]), "height, width"),
    "shapes_word": (transformer(shapes="static"), "dynamic"),
    "top_level_list": (lambda d: (d.clear(), d.update(format="litedge-bundle", version=1)), "no 'model'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_manifest_edits_refused(bundle, case):
    edit, match = MANIFEST_EDITS[case]
    edit_manifest(bundle, edit)
    refused(bundle, match)


@pytest.mark.parametrize("text, match", [
    ('{"format": "litedge-bundle", "format": "x", "version": 1}', "duplicate key"),
    ('{"format": "litedge-bundle", "version": NaN}', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ("", "not valid JSON"),
])
def test_bad_json_refused(bundle, text, match):
    (bundle / MANIFEST_NAME).write_text(text)
    refused(bundle, match)


def test_huge_manifest_refused_without_reading(bundle):
    with open(bundle / MANIFEST_NAME, "r+b") as f:  # sparse: no disk or memory used
        f.truncate(MAX_MANIFEST_BYTES + 1)
    refused(bundle, "bytes, expected at most")


def test_manifest_symlink_outside(bundle, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((bundle / MANIFEST_NAME).read_bytes())
    (bundle / MANIFEST_NAME).unlink()
    (bundle / MANIFEST_NAME).symlink_to(outside)
    refused(bundle, "outside the bundle")


def test_symlinked_directory_escape(bundle, tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "t.onnx").write_bytes(b"transformer-graph")
    (bundle / "sub").symlink_to(tmp_path / "secret", target_is_directory=True)
    edit_manifest(bundle, transformer(file="sub/t.onnx"))
    refused(bundle, "outside the bundle")


def test_symlink_loop(bundle):
    (bundle / "loop.onnx").symlink_to("loop.onnx")
    edit_manifest(bundle, transformer(file="loop.onnx"))
    refused(bundle, "loop.onnx")


def test_symlink_inside_directory_component(bundle, tmp_path):
    (tmp_path / "big").write_bytes(b"x")
    (bundle / "vae_decoder.mlpackage" / "Data" / "link").symlink_to(tmp_path / "big")
    refused(bundle, "symlink inside a directory component", structural=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_fifo_component_does_not_hang(bundle):
    (bundle / "transformer.onnx").unlink()
    os.mkfifo(bundle / "transformer.onnx")
    refused(bundle, "not a regular file")


def test_truncated_file(bundle):
    path = bundle / "transformer.onnx.data"
    path.write_bytes(path.read_bytes()[:100])
    refused(bundle, r"transformer\.onnx\.data: sha256 mismatch", structural=False)


def test_structure_check_needs_no_file_reads(bundle):
    """load_manifest alone never opens component files (safe on untrusted bundles)."""
    (bundle / "transformer.onnx").unlink()
    assert load_manifest(bundle).components["transformer"].file == "transformer.onnx"
