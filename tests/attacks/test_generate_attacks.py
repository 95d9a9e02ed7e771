"""lit-generate on hostile input: bad values, tampered bundles, outputs it must not clobber, memory bounds.

Every case: exit 2 (130 for Ctrl-C), one stderr line, no traceback, the work folder unchanged
(a PNG already at the output path keeps its bytes, no temporary is left).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litedge.cli.generate import main
from litedge.runtime import memory
from tests.attacks.helpers import assert_refused, edit_manifest, rehash, run, snapshot

OLD_PNG = b"\x89PNG\r\n\x1a\n an image the user already had"


def refused(capfd, work: Path, argv: list, *fragments: str) -> str:
    """Run lit-generate over an existing out.png in ``work``; assert the refusal and nothing changed."""
    target = work / "out.png"
    if not os.path.lexists(target):
        target.write_bytes(OLD_PNG)
    before = snapshot(work)
    code, _, err = run(main, [*argv, "--quiet"] if "-o" in argv or "--output-dir" in argv else
                       [*argv, "-o", target, "--quiet"], capfd)
    line = assert_refused(code, err, *fragments, prog="lit-generate")
    assert snapshot(work) == before
    return line


# ----------------------------------------------------------------------------- request values

BAD_REQUESTS = {
    "size_100000": (["--size", "100000"], "needs about", "the largest that fits is"),
    "batch_100000": (["--size", "64", "--batch", "100000"], "needs about", "batch that fits at 64x64"),
    "size_and_batch_huge": (["--size", "8192", "--batch", "4096"], "needs about"),
    "height_huge": (["--height", "400000", "--width", "4000"], "needs about"),
    "batch_zero": (["--batch", "0"], "--batch must be a positive integer"),
    "batch_negative": (["--batch", "-3"], "--batch must be a positive integer"),
    "steps_zero": (["--steps", "0"], "steps must be a positive integer"),
    "steps_negative": (["--steps", "-5"], "steps must be a positive integer"),
    "steps_1000_repeats_timesteps": (["--steps", "1000"], "use at most 999 steps"),
    "steps_100000": (["--steps", "100000"], "above 1000"),
    "guidance_1e308": (["--guidance", "1e308"], "above 100"),
    "guidance_101": (["--guidance", "101"], "above 100"),
    "guidance_inf": (["--guidance", "inf"], "guidance scale must be a number"),
    "guidance_nan": (["--guidance", "nan"], "guidance scale must be a number"),
    "guidance_negative": (["--guidance", "-1"], "guidance scale must be a number"),
    "size_not_multiple": (["--size", "63"], "multiple of 16"),
    "size_zero": (["--size", "0"], "multiple of 16"),
    "size_negative": (["--size", "-64"], "multiple of 16"),
    "width_not_multiple": (["--height", "64", "--width", "72"], "multiple of 16"),
    "size_and_height": (["--size", "64", "--height", "64"], "either --size or --height/--width"),
    "seed_negative": (["--seed", "-1"], "seed must be an integer >= 0"),
    "scheduler_unknown": (["--scheduler", "nope"], "nope"),
    "scheduler_wrong_kind": (["--scheduler", "flow-euler"], "does not fit"),
    "prompt_not_utf8": (["\udcff\udcfe cat"], "not valid UTF-8"),
    "negative_not_utf8": (["a cat", "--negative", "bad \udc80"], "negative prompt is not valid UTF-8"),
    "steps_not_int": (["--steps", "ten"], "invalid int value"),
    "size_float": (["--size", "1e3"], "invalid int value"),
    "guidance_word": (["--guidance", "lots"], "invalid float value"),
    "device_unknown": (["--device", "tpu"], "invalid choice"),
    "unknown_flag": (["--frobnicate"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_refused(case, session_bundle, tmp_path, capfd):
    argv, *fragments = BAD_REQUESTS[case]
    prompt = [] if argv and not argv[0].startswith("-") else ["a red square"]
    refused(capfd, tmp_path, [*prompt, *argv, "--bundle", session_bundle], *fragments)


# ----------------------------------------------------------------------------- outputs

def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


OUTPUTS = {
    "wrong_suffix": (lambda w: w / "out.jpg", "must be a .png"),
    "missing_folder": (lambda w: w / "nope" / "out.png", "does not exist"),
    "a_directory": (lambda w: (w / "d.png").mkdir() or w / "d.png", "is a directory"),
    "a_fifo": (lambda w: _fifo(w / "f.png"), "not a regular file"),
    "a_symlink": (lambda w: (w / "l.png").symlink_to(w / "out.png") or w / "l.png", "a symlink"),
    "dangling_symlink": (lambda w: (w / "l.png").symlink_to(w / "gone.png") or w / "l.png", "a symlink"),
    "below_a_file": (lambda w: w / "out.png" / "x.png", "does not exist"),
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_output_refused_before_compute(case, session_bundle, tmp_path, capfd):
    (tmp_path / "out.png").write_bytes(OLD_PNG)
    make, fragment = OUTPUTS[case]
    target = make(tmp_path)
    refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1", "-o", target],
            fragment)
    assert (tmp_path / "out.png").read_bytes() == OLD_PNG


@pytest.mark.parametrize("device", [(1, 7), (1, 3)], ids=["full", "null"])
def test_character_device_named_like_the_output_is_never_replaced(device, session_bundle, tmp_path, capfd):
    """A character device at the output path (``mknod x.png c 1 7``, as /dev/full) is refused, not replaced."""
    import stat as st

    node = tmp_path / "x.png"
    try:
        os.mknod(node, st.S_IFCHR | 0o666, os.makedev(*device))
    except (PermissionError, AttributeError, OSError):
        pytest.skip("creating a device node needs root")
    refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1", "-o", node],
            "a device or FIFO")
    assert st.S_ISCHR(os.lstat(node).st_mode)


def test_output_dir_that_is_a_file(session_bundle, tmp_path, capfd):
    (tmp_path / "file").write_text("x")
    refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--output-dir", tmp_path / "file"], "does not exist")


# ----------------------------------------------------------------------------- bundles

def _flip(rel: str):
    def edit(bundle: Path) -> None:
        path = bundle / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return edit


def _model(**fields):
    return lambda b: edit_manifest(b, lambda d: d["model"].update(fields))


def _defaults(**fields):
    return lambda b: edit_manifest(b, lambda d: d["defaults"].update(fields))


def _target(**fields):
    return lambda b: edit_manifest(b, lambda d: d["target"].update(fields))


def _then_rehash(edit):
    def both(bundle: Path) -> None:
        edit(bundle)
        rehash(bundle)
    return both


def _swap(a: str, b: str):
    def edit(bundle: Path) -> None:
        (bundle / a).rename(bundle / "swap.tmp")
        (bundle / b).rename(bundle / a)
        (bundle / "swap.tmp").rename(bundle / b)
        rehash(bundle)
    return edit


TAMPERED = {
    "vae_factor_zero": (_model(vae_scale_factor=0), "vae_scale_factor"),
    "vae_factor_string": (_model(vae_scale_factor="8"), "vae_scale_factor"),
    "vae_factor_float": (_model(vae_scale_factor=8.5), "vae_scale_factor"),
    "vae_factor_huge": (_model(vae_scale_factor=1 << 40), "vae_scale_factor"),
    "latent_channels_string": (_model(latent_channels="4"), "latent_channels"),
    "latent_channels_zero": (_model(latent_channels=0), "latent_channels"),
    "latent_channels_negative": (_model(latent_channels=-4), "latent_channels"),
    "patch_size_zero": (_model(patch_size=0), "patch_size"),
    "patch_size_list": (_model(patch_size=[2]), "patch_size"),
    "text_length_negative": (_model(text_max_length=-1), "text_max_length"),
    "text_length_1e9": (_model(text_max_length=1e9), "text_max_length"),
    "text_length_10e9_int": (_model(text_max_length=10**9), "text_max_length"),
    "text_length_string": (_model(text_max_length="300"), "text_max_length"),
    "learned_sigma_string": (_model(learned_sigma="yes"), "learned_sigma"),
    "prediction_type_unknown": (_model(prediction_type="x0-magic"), "prediction_type"),
    "sample_size_zero": (_model(sample_size=0), "sample_size"),
    "scaling_factor_zero": (_model(vae_scaling_factor=0), "vae_scaling_factor"),
    "scaling_factor_string": (_model(vae_scaling_factor="0.13"), "vae_scaling_factor"),
    "num_classes_zero": (_model(num_classes=0), "num_classes"),
    "family_number": (_model(family=7), "family"),
    "default_steps_zero": (_defaults(steps=0), "defaults.steps"),
    "default_steps_100000": (_defaults(steps=100000), "defaults.steps"),
    "default_steps_string": (_defaults(steps="20"), "defaults.steps"),
    "default_guidance_1e308": (_defaults(guidance_scale=1e308), "defaults.guidance_scale"),
    "default_guidance_negative": (_defaults(guidance_scale=-2), "defaults.guidance_scale"),
    "default_guidance_string": (_defaults(guidance_scale="4.5"), "defaults.guidance_scale"),
    "default_height_zero": (_defaults(height=0), "defaults.height"),
    "default_height_huge": (_defaults(height=100000), "defaults.height"),
    "default_width_float": (_defaults(width=63.5), "defaults.width"),
    "providers_string": (_target(providers="CPUExecutionProvider"), "target.providers"),
    "providers_numbers": (_target(providers=[1]), "target.providers"),
    "target_name_number": (_target(name=5), "target.name"),
    "scheduler_list": (lambda b: edit_manifest(b, lambda d: d.update(scheduler=[])), "scheduler"),
    "scheduler_type_number": (lambda b: edit_manifest(b, lambda d: d["scheduler"].update(type=5)), "scheduler.type"),
    "scheduler_config_list": (lambda b: edit_manifest(b, lambda d: d["scheduler"].update(config=[])),
                              "scheduler.config"),
    "transformer_flipped": (_flip("transformer.onnx"), "sha256 mismatch"),
    "vae_flipped": (_flip("vae_decoder.onnx"), "sha256 mismatch"),
    "text_encoder_flipped": (_flip("text_encoder.onnx"), "sha256 mismatch"),
    "tokenizer_flipped": (_flip("tokenizer/tokenizer.json"), "sha256 mismatch"),
    "transformer_missing": (lambda b: (b / "transformer.onnx").unlink(), "missing"),
    "tokenizer_missing": (lambda b: shutil.rmtree(b / "tokenizer"), "missing"),
    "manifest_missing": (lambda b: (b / "manifest.json").unlink(), "not a litedge bundle"),
    "manifest_garbage": (lambda b: (b / "manifest.json").write_bytes(b"\xff\xfe{{{"), "not valid JSON"),
    "unlisted_external_data": (lambda b: (b / "transformer.onnx.data").write_bytes(os.urandom(4096)),
                               "not listed in its manifest"),
    "unlisted_file": (lambda b: (b / "notes.txt").write_text("hi"), "not listed in its manifest"),
    "unlisted_symlink": (lambda b: (b / "link").symlink_to("/etc/passwd"), "not listed in its manifest"),
    "garbage_tokenizer_rehashed": (_then_rehash(lambda b: (b / "tokenizer" / "tokenizer.json").write_bytes(
        os.urandom(300))), "the tokenizer cannot be read"),
    "garbage_tokenizer_config_rehashed": (_then_rehash(lambda b: (b / "tokenizer" / "tokenizer_config.json")
                                                       .write_text("{not json")), "the tokenizer cannot be read"),
    "garbage_transformer_rehashed": (_then_rehash(lambda b: (b / "transformer.onnx").write_bytes(os.urandom(999))),
                                     "onnxruntime cannot load"),
    "garbage_vae_rehashed": (_then_rehash(lambda b: (b / "vae_decoder.onnx").write_bytes(b"")),
                             "onnxruntime cannot load"),
    "swapped_transformer_vae": (_swap("transformer.onnx", "vae_decoder.onnx"), "were swapped or replaced"),
    "swapped_text_encoder_vae": (_swap("text_encoder.onnx", "vae_decoder.onnx"), "were swapped or replaced"),
    "swapped_text_encoder_transformer": (_swap("text_encoder.onnx", "transformer.onnx"), "were swapped or replaced"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_bundle_refused(case, bundle, tmp_path, capfd):
    edit, fragment = TAMPERED[case]
    edit(bundle)
    refused(capfd, tmp_path, ["a red square", "--bundle", bundle, "--size", "64", "--steps", "2"], fragment)


@pytest.mark.parametrize("bundle_path", ["missing", "a_file", "empty_dir"])
def test_not_a_bundle(bundle_path, tmp_path, capfd):
    path = tmp_path / "x.litedge"
    if bundle_path == "a_file":
        path.write_text("x")
    elif bundle_path == "empty_dir":
        path.mkdir()
    refused(capfd, tmp_path, ["a cat", "--bundle", path], "bundle")


# ----------------------------------------------------------------------------- memory bound from the manifest

def test_a_request_just_inside_the_memory_bound_runs(session_bundle, tmp_path, capfd, monkeypatch):
    """The bound comes from the manifest: at 'available = estimate(128 px)', 128 px runs and 144 px is
    refused with a message naming 128 as the largest size that fits (and the largest batch)."""
    from litedge.bundle import load_manifest

    manifest = load_manifest(session_bundle)
    need = memory.estimate_bytes(memory.Model.of(manifest, session_bundle),
                                 memory.Shape(128, 128, 1, True, vae_tile=64))
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    line = refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "144", "--steps", "1"],
                   "the largest that fits is 128x128 px at batch 1")
    assert "GiB" in line
    out = tmp_path / "ok.png"
    code, _, err = run(main, ["a cat", "--bundle", session_bundle, "--size", "128", "--steps", "1", "--quiet",
                              "-o", out], capfd)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_just_inside_the_memory_bound_runs(session_bundle, tmp_path, capfd, monkeypatch):
    from litedge.bundle import load_manifest

    manifest = load_manifest(session_bundle)
    need = memory.estimate_bytes(memory.Model.of(manifest, session_bundle), memory.Shape(64, 64, 3, True, 64))
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "64", "--batch", "4", "--steps", "1"],
            "or batch 3 at 64x64")
    code, _, err = run(main, ["a cat", "--bundle", session_bundle, "--size", "64", "--batch", "3", "--steps", "1",
                              "--quiet", "-o", tmp_path / "b.png"], capfd)
    assert code == 0, err


def test_out_of_memory_error_is_one_line(session_bundle, tmp_path, capfd, monkeypatch):
    """A MemoryError that still happens (the estimate is not a bound) is one line, not a traceback."""
    from litedge.runtime import pipeline

    def boom(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(pipeline.Pipeline, "denoise", boom)
    refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1"], "out of memory")


def test_disk_full_while_writing_the_png(session_bundle, tmp_path, capfd, monkeypatch):
    import errno

    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        refused(capfd, tmp_path, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1"], "disk is full")
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)


def test_planted_symlink_at_a_temp_name_is_never_followed(session_bundle, tmp_path, capfd):
    """Not a refusal: the old fixed temp name now means nothing; the victim file keeps its bytes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".out.png.tmp", ".out.png.tmp.png", f".out.png.tmp-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    code, _, err = run(main, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1", "--quiet", "-o",
                              tmp_path / "out.png"], capfd)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- interrupt

@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals")
def test_sigint_is_interrupted_130_and_no_png(session_bundle, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(OLD_PNG)
    before = snapshot(tmp_path)
    code = ("import sys, time\n"
            "from litedge.runtime import pipeline\n"
            "real = pipeline.Pipeline.denoise\n"
            "def slow(self, *a, **k):\n"
            "    open(sys.argv[1], 'w').close(); time.sleep(60)\n"
            "pipeline.Pipeline.denoise = slow\n"
            "from litedge.cli.generate import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    ready = tmp_path.parent / f"{tmp_path.name}-ready"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready), "a cat", "--bundle", str(session_bundle),
                             "--size", "64", "--steps", "1", "--quiet", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    ready.unlink()
    assert_refused(proc.returncode, err, status=130, prog="lit-generate")
    assert snapshot(tmp_path) == before


def test_ctrl_c_while_the_png_is_written_leaves_the_old_one(session_bundle, tmp_path, capfd, monkeypatch):
    """KeyboardInterrupt inside the PNG encoder: the temporary is removed, the old PNG keeps its bytes."""
    from PIL import Image

    def interrupted(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    (tmp_path / "out.png").write_bytes(OLD_PNG)
    before = snapshot(tmp_path)
    code, _, err = run(main, ["a cat", "--bundle", session_bundle, "--size", "64", "--steps", "1", "--quiet", "-o",
                              tmp_path / "out.png"], capfd)
    assert_refused(code, err, status=130, prog="lit-generate")
    assert snapshot(tmp_path) == before
