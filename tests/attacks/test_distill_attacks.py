"""lit-distill on hostile input: numbers that cannot train, paths, broken data and caches, decompression
bombs, missing extras, a diverging run (never a NaN student), EIO on the final rename, Ctrl-C, and the
recovery of an interrupted student swap.

Every refusal: exit 2 (130 for Ctrl-C), one stderr line, no traceback, no run folder left behind when the
run created it, and an existing work folder unchanged unless the case says what changed.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

from litedge.cli.distill import main
from tests.attacks.helpers import assert_refused, dead_pid, run, snapshot


def argv_for(teacher: Path, data: Path, out: Path, **flags) -> list[str]:
    base = {"--teacher": teacher, "--family": "lit", "--data": data, "--out": out, "--resolution": "64",
            "--batch": "2", "--steps": "1", "--text-max-length": "16", "--save-every": "1", "--ema": "0"}
    base.update({k if k.startswith("-") else "--" + k.replace("_", "-"): v for k, v in flags.items()})
    out_argv = []
    for key, value in base.items():
        if value is None:
            continue
        out_argv += [key] if value is True else [f"{key}={value}"]
    return [*out_argv, "--no-progress", "-q"]


def refused(capfd, work: Path, argv: list, *fragments: str, status: int = 2) -> str:
    before = snapshot(work)
    code, _, err = run(main, argv, capfd)
    line = assert_refused(code, err, *fragments, status=status, prog="lit-distill")
    assert snapshot(work) == before
    return line


# ----------------------------------------------------------------------------- numbers and flags

NUMBERS = {
    "lr_nan": ({"lr": "nan"}, "--lr nan"),
    "lr_inf": ({"lr": "inf"}, "--lr inf"),
    "lr_negative_inf": ({"lr": "-inf"}, "--lr -inf"),
    "lr_negative": ({"lr": "-1e-4"}, "expected a finite number > 0"),
    "lr_zero": ({"lr": "0"}, "expected a finite number > 0"),
    "weight_decay_nan": ({"weight_decay": "nan"}, "--weight-decay"),
    "weight_decay_negative": ({"weight_decay": "-1"}, "--weight-decay"),
    "task_weight_inf": ({"task_weight": "inf"}, "--task-weight"),
    "lambda_noise_nan": ({"lambda_noise": "nan"}, "--lambda-noise"),
    "lambda_var_negative": ({"lambda_var": "-0.5"}, "--lambda-var"),
    "feature_weight_inf": ({"feature_weight": "inf"}, "--feature-weight"),
    "text_length_zero": ({"text_max_length": "0"}, "--text-max-length 0"),
    "text_length_negative": ({"text_max_length": "-5"}, "--text-max-length -5"),
    "text_length_huge": ({"text_max_length": "100000"}, "<= 4096"),
    "steps_negative": ({"steps": "-1"}, "--steps"),
    "batch_zero": ({"batch": "0"}, "--batch"),
    "save_every_zero": ({"save_every": "0"}, "--save-every"),
    "ema_one_and_a_half": ({"ema": "1.5"}, "--ema"),
    "ema_negative": ({"ema": "-0.1"}, "--ema"),
    "resolution_tiny": ({"resolution": "4"}, "--resolution"),
    "heads_zero": ({"heads": "0"}, "--heads"),
    "device_tpu": ({"device": "tpu"}, "expected cpu, cuda or cuda:N"),
    "device_cuda_garbage": ({"device": "cuda:x"}, "expected cpu, cuda or cuda:N"),
    "lr_word": ({"lr": "fast"}, "invalid float value"),
    "steps_float": ({"steps": "1.5"}, "invalid int value"),
    "family_unknown": ({"family": "mamba"}, "invalid choice"),
    "precision_unknown": ({"precision": "fp8"}, "invalid choice"),
    "teacher_missing_flag": ({"--teacher": None}, "required"),
    "out_empty": ({"--out": ""}, "--out is empty"),
}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_bad_number_refused_before_any_work(case, teacher_dir, small_data, tmp_path, capfd):
    flags, fragment = NUMBERS[case]
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run", **flags), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda(device, teacher_dir, small_data, tmp_path, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run", device=device),
            "CUDA is not available")


def test_out_that_is_a_file(teacher_dir, small_data, tmp_path, capfd):
    (tmp_path / "run").write_text("my notes")
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run"), "is not a folder")


def test_out_that_is_a_symlink_to_a_file(teacher_dir, small_data, tmp_path, capfd):
    (tmp_path / "notes").write_text("my notes")
    (tmp_path / "run").symlink_to(tmp_path / "notes")
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run"), "is not a folder")


@pytest.mark.parametrize("resolution", ["60", "72", "100"])
def test_resolution_not_a_multiple_of_the_model(resolution, teacher_dir, small_data, tmp_path, capfd):
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run", resolution=resolution),
            "must be a multiple of 16")


# ----------------------------------------------------------------------------- extras

def test_without_torch_names_the_extra(teacher_dir, small_data, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run"), "pip install 'litedge[distill]'")


def test_with_only_the_export_extra_matplotlib_is_missing_at_start(teacher_dir, small_data, tmp_path, capfd,
                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run"), "matplotlib",
            "pip install 'litedge[distill]'")


# ----------------------------------------------------------------------------- teacher and data

def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _jsonl(text: bytes):
    def make(work: Path) -> Path:
        path = work / "data.jsonl"
        path.write_bytes(text)
        return path
    return make


DATA = {
    "missing": (lambda w: w / "nope", "no such file"),
    "text_file": (lambda w: _file(w / "d.txt"), "expected a folder of images"),
    "empty_folder": (lambda w: (w / "empty").mkdir() or w / "empty", "no images found"),
    "jsonl_binary_garbage": (_jsonl(b"\xff\xfe\x00\x9c" * 50), "not UTF-8 text"),
    "jsonl_not_objects": (_jsonl(b"[1, 2]\n"), 'expected a JSON object with "path"'),
    "jsonl_path_number": (_jsonl(b'{"path": 5, "caption": "a"}\n'), 'expected a JSON object with "path"'),
    "jsonl_caption_number": (_jsonl(b'{"path": "a.png", "caption": 7}\n'), 'expected a JSON object with "path"'),
    "jsonl_truncated_line": (_jsonl(b'{"path": "a.png", "capt'), 'expected a JSON object with "path"'),
    "jsonl_deep_nesting": (_jsonl(b"[" * 100000 + b"]" * 100000), 'expected a JSON object with "path"'),
    "jsonl_no_caption": (_jsonl(b'{"path": "a.png"}\n'), "--allow-missing-captions"),
    "jsonl_empty": (_jsonl(b"\n\n"), "no images found"),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_refused(case, teacher_dir, tmp_path, capfd):
    make, fragment = DATA[case]
    data = make(tmp_path)
    line = refused(capfd, tmp_path, argv_for(teacher_dir, data, tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists(), line


def _broken_teacher(edit):
    def make(teacher: Path, work: Path) -> Path:
        copy = Path(shutil.copytree(teacher, work / "teacher"))
        edit(copy)
        return copy
    return make


TEACHERS = {
    "missing": (lambda t, w: w / "nope", None),
    "garbage_config": (_broken_teacher(lambda c: (c / "transformer" / "config.json").write_text("{garbage")), None),
    "config_not_object": (_broken_teacher(lambda c: (c / "transformer" / "config.json").write_text("7")), None),
    "truncated_weights": (_broken_teacher(lambda c: (c / "transformer" / "diffusion_pytorch_model.safetensors")
                                          .write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")), None),
    "a_text_file": (lambda t, w: _file(w / "t.txt"), None),
}


@pytest.mark.parametrize("case", sorted(TEACHERS))
def test_bad_teacher_refused(case, teacher_dir, small_data, tmp_path, capfd):
    make, fragment = TEACHERS[case]
    teacher = make(teacher_dir, tmp_path)
    refused(capfd, tmp_path, argv_for(teacher, small_data, tmp_path / "run"), *([fragment] if fragment else []))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- feature caches

def _cache(work: Path, index, shard: bytes | None = None) -> Path:
    cache = work / "cache"
    cache.mkdir()
    (cache / "cache.json").write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    if shard is not None:
        (cache / "shard-00000.safetensors").write_bytes(shard)
    return cache


def _shard(**tensors) -> bytes:
    import torch
    from safetensors.torch import save

    return save({k: torch.zeros(v) for k, v in tensors.items()})


GOOD_INDEX = {"format": "litedge-feature-cache", "version": 1, "count": 4, "resolution": 64,
              "keys": ["encoder_attention_mask", "encoder_hidden_states", "latents"], "text_max_length": 16}
SHAPES = {"latents": (4, 4, 8, 8), "encoder_hidden_states": (4, 16, 32), "encoder_attention_mask": (4, 16)}

CACHES = {
    "garbage_index": (lambda w: _cache(w, b"\x00\xffnot json"), "unreadable feature-cache index"),
    "index_is_a_list": (lambda w: _cache(w, [1, 2]), "not a feature-cache index"),
    "index_without_count": (lambda w: _cache(w, {**GOOD_INDEX, "count": "four"}), "not a feature-cache index"),
    "index_other_format": (lambda w: _cache(w, {**GOOD_INDEX, "format": "x"}), "not a litedge feature cache"),
    "truncated_shard": (lambda w: _cache(w, GOOD_INDEX, _shard(**SHAPES)[:300]), "truncated or damaged cache shard"),
    "garbage_shard": (lambda w: _cache(w, GOOD_INDEX, os.urandom(2048)), "truncated or damaged cache shard"),
    "shard_missing_a_key": (lambda w: _cache(w, GOOD_INDEX, _shard(latents=(4, 4, 8, 8))), "cache shard without"),
    "shard_count_mismatch": (lambda w: _cache(w, {**GOOD_INDEX, "count": 9}, _shard(**SHAPES)), "cache.json says 9"),
}


@pytest.mark.parametrize("case", sorted(CACHES))
def test_damaged_cache_refused(case, teacher_dir, tmp_path, capfd):
    make, fragment = CACHES[case]
    cache = make(tmp_path)
    refused(capfd, tmp_path, argv_for(teacher_dir, cache, tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- hostile images

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _truncated_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[:200]


IMAGES = {
    "decompression_bomb": lambda: _png_header_only(100_000, 100_000),
    "bomb_over_the_warning_limit": lambda: _png_header_only(10_000, 10_000),
    "truncated_200_bytes": _truncated_png,
    "no_iend": lambda: _png_header_only(64, 64)[:-12],
}


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_dataset_of_hostile_images_is_refused(case, teacher_dir, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"{i}.png").write_bytes(IMAGES[case]())
        (data / f"{i}.txt").write_text("a red square")
    refused(capfd, tmp_path, argv_for(teacher_dir, data, tmp_path / "run"), "could be decoded")
    assert not (tmp_path / "run").exists()


def test_hostile_images_are_skipped_and_the_run_continues(teacher_dir, small_data, tmp_path, capfd):
    """Not a refusal: a bomb and a truncated PNG among good images are skipped, counted, never decoded."""
    data = Path(shutil.copytree(small_data, tmp_path / "data"))
    (data / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (data / "bomb.txt").write_text("a bomb")
    (data / "cut.png").write_bytes(_truncated_png())
    (data / "cut.txt").write_text("a cut")
    code, out, err = run(main, argv_for(teacher_dir, data, tmp_path / "run"), capfd)
    assert code == 0, err
    cache = json.loads((tmp_path / "run" / "cache" / "64px" / "cache.json").read_text())
    assert cache["count"] == 4 and sorted(Path(p).name for p in cache["skipped"]) == ["bomb.png", "cut.png"]


# ----------------------------------------------------------------------------- divergence, EIO, interrupts

def test_lr_that_diverges_never_publishes_a_nan_student(teacher_dir, small_data, tmp_path, capfd):
    """--lr 1e30 is finite but blows the weights up: the NaN loss of step 2 stops the run before a
    checkpoint or student/ is written, and the run folder it created is removed."""
    line = refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run", lr="1e30", steps="2",
                                             save_every="100"), "nothing was published")
    assert "diverged" in line and not (tmp_path / "run").exists()


def test_nan_weights_with_a_finite_loss_are_never_written(teacher_dir, small_data, tmp_path, capfd, monkeypatch):
    """Weights that overflow in the last update (the loss of that step was still finite): not published."""
    import torch

    from litedge.distill import trainer

    real = trainer._Trainer.train_step

    def overflow(self, step):
        losses = real(self, step)
        with torch.no_grad():
            next(self.student.parameters()).fill_(float("inf"))
        return losses
    monkeypatch.setattr(trainer._Trainer, "train_step", overflow)
    line = refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run"), "not finite", "not written")
    assert not (tmp_path / "run").exists(), line


def test_lr_beyond_float32(teacher_dir, small_data, tmp_path, capfd):
    refused(capfd, tmp_path, argv_for(teacher_dir, small_data, tmp_path / "run", lr="1e39"), "float32 can hold")


def test_eio_on_the_final_rename_is_one_line(teacher_dir, small_data, tmp_path, capfd, monkeypatch):
    import errno

    from litedge import atomic

    real = atomic.replace_dir

    def replace_dir(src, dst):
        if Path(dst).name == "student":
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(atomic, "replace_dir", replace_dir)
    code, _, err = run(main, argv_for(teacher_dir, small_data, tmp_path / "run"), capfd)
    assert_refused(code, err, "Input/output error", "student", prog="lit-distill")
    run_dir = tmp_path / "run"
    assert not (run_dir / "student").exists()
    hidden = [p for p in run_dir.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert hidden == []


def test_interrupted_student_swap_is_recovered_by_the_next_run(teacher_dir, small_data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    aside = Path(shutil.copytree(teacher_dir, run_dir / f".student.old-{pid}-{secrets.token_hex(8)}"))
    half = run_dir / f".student.tmp-{pid}-{secrets.token_hex(8)}"
    half.mkdir()
    (run_dir / "checkpoints").mkdir()
    stale = run_dir / "checkpoints" / f".step-000003.tmp-{pid}-{secrets.token_hex(8)}"
    stale.mkdir()
    live = run_dir / "checkpoints" / f".step-000004.tmp-{os.getpid()}-{secrets.token_hex(8)}"
    live.mkdir()
    code, _, err = run(main, argv_for(teacher_dir, small_data, run_dir, resume=True), capfd)
    assert_refused(code, err, "no complete checkpoint", prog="lit-distill")
    assert (run_dir / "student" / "model_index.json").is_file()
    assert not aside.exists() and not half.exists() and not stale.exists() and live.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigint_is_interrupted_130(teacher_dir, small_data, tmp_path):
    import signal
    import subprocess
    import time

    ready = tmp_path.parent / f"{tmp_path.name}.ready"
    code = ("import sys, time\n"
            "from litedge.distill import trainer\n"
            "def slow(source):\n"
            "    open(sys.argv[1], 'w').close(); time.sleep(60)\n"
            "trainer.load_teacher = slow\n"
            "from litedge.cli.distill import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready),
                             *argv_for(teacher_dir, small_data, tmp_path / "run")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    ready.unlink()
    assert_refused(proc.returncode, err, status=130, prog="lit-distill")
    assert not (tmp_path / "run").exists()  # the run it created had no checkpoint yet
