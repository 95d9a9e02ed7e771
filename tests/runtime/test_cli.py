"""lit-generate end to end and its bad inputs: one line on stderr, exit 2, no output file."""

import json
import shutil

import pytest

from litedge.cli import generate as generate_cli
from litedge.cli.generate import main
from litedge.runtime import read_metadata
from tests.cli import run_main


def _run(argv, capsys):
    return run_main(main, argv, capsys)


def test_generates_a_png_with_metadata(pixart_bundle, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, err = _run(["a red fox", "--bundle", pixart_bundle, "--size", 64, "--steps", 2, "--seed", 4,
                              "--guidance", 3, "--quiet", "-o", out], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    meta = read_metadata(out)
    assert meta["prompt"] == "a red fox" and meta["seed"] == 4 and meta["steps"] == 2 and meta["guidance_scale"] == 3.0
    assert "denoising" not in err  # --quiet


def test_batch_into_an_output_dir(pixart_bundle, tmp_path, capsys):
    code, stdout, err = _run(["a cat", "--bundle", pixart_bundle, "--height", 32, "--width", 64, "--steps", 1,
                              "--batch", 2, "--output-dir", tmp_path], capsys)
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a-cat-0-0.png", "a-cat-0-1.png"]
    assert "denoising" in err and "s/step" in err  # the progress bar with per-step time
    assert [read_metadata(tmp_path / n)["index"] for n in names] == [0, 1]


def test_too_long_prompt_warns_and_works(pixart_bundle, tmp_path, capsys):
    out = tmp_path / "long.png"
    code, _, err = _run([" ".join(["the red cat"] * 30), "--bundle", pixart_bundle, "--steps", 1, "--quiet", "-o", out],
                        capsys)
    assert code == 0 and out.is_file()
    assert "the rest is ignored" in err


def _edited_copy(bundle, tmp_path, edit):
    copy = tmp_path / "copy.litedge"
    shutil.copytree(bundle, copy)
    edit(copy)
    return copy


def _version_99(d):
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))


def _corrupt(d):
    data = bytearray((d / "vae_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (d / "vae_decoder.onnx").write_bytes(bytes(data))


@pytest.mark.parametrize("case, argv, message", [
    ("missing", ["--bundle", "{tmp}/nope.litedge"], "no such bundle directory"),
    ("no bundle", [], "no bundle: pass --bundle"),
    ("version", ["--bundle", "{v99}"], "bundle format version 99"),
    ("sha256", ["--bundle", "{corrupt}"], "sha256 mismatch"),
    ("size", ["--bundle", "{b}", "--size", "1000"], "multiple of 16"),
    ("size and height", ["--bundle", "{b}", "--size", "64", "--height", "64"], "either --size or --height"),
    ("steps", ["--bundle", "{b}", "--steps", "0"], "steps must be a positive integer"),
    ("guidance", ["--bundle", "{b}", "--guidance", "-2"], "guidance scale must be a number >= 0"),
    ("batch", ["--bundle", "{b}", "--batch", "0"], "--batch must be a positive integer"),
    ("device", ["--bundle", "{b}", "--device", "cuda"], "device 'cuda' is not available"),
    ("class", ["--bundle", "{b}", "--class", "3"], "text-to-image"),
])
def test_bad_input_one_line_exit_2_no_output(case, argv, message, pixart_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "DEMO_BUNDLE", tmp_path / "unshipped.litedge")  # "no bundle": demo absent
    places = {"tmp": tmp_path, "b": pixart_bundle,
              "v99": _edited_copy(pixart_bundle, tmp_path, _version_99) if case == "version" else None,
              "corrupt": _edited_copy(pixart_bundle, tmp_path, _corrupt) if case == "sha256" else None}
    argv = [a.format(**places) for a in argv]
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    code, stdout, err = _run(["a cat", *argv, "--steps" if "--steps" not in argv else "--seed", "1", "--quiet",
                              "-o", out], capsys)
    assert code == 2, err
    assert err.startswith("lit-generate: error: ") and err.count("\n") == 1 and message in err, err
    assert not any(out.parent.iterdir())


@pytest.mark.parametrize("output, message", [
    ("{tmp}/afile.txt/image.png", "does not exist"),
    ("{tmp}/missing/image.png", "does not exist"),
    ("{tmp}/image.jpg", "must be a .png file"),
    ("/proc/image.png", "cannot write"),
])
def test_unwritable_output(output, message, pixart_bundle, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    code, _, err = _run(["a cat", "--bundle", pixart_bundle, "--steps", 1, "--quiet", "-o",
                         output.format(tmp=tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]
