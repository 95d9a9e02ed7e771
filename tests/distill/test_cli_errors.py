"""lit-distill on bad input: one clear line on stderr, exit status 2 (or a counted skip)."""

import json
import shutil

import pytest

from litedge.cli.distill import main


def run(capsys, teacher, data, out, *extra):
    argv = ["--teacher", str(teacher), "--family", "lit", "--data", str(data), "--out", str(out),
            "--resolution", "64", "--batch", "2", "--steps", "1", "--text-max-length", "16", "--no-progress", *extra]
    code = main(argv)
    return code, capsys.readouterr()


def assert_one_line_error(code, captured, *fragments):
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lit-distill: error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_family_the_teacher_cannot_take(capsys, pixart_teacher, shapes_data, tmp_path):
    code, captured = run(capsys, pixart_teacher, shapes_data, tmp_path / "run", "--family", "mmedit")
    assert_one_line_error(code, captured, "needs an SD3", "PixArtTransformer2DModel")


def test_empty_data_folder(capsys, pixart_teacher, tmp_path):
    (tmp_path / "empty").mkdir()
    code, captured = run(capsys, pixart_teacher, tmp_path / "empty", tmp_path / "run")
    assert_one_line_error(code, captured, "no images found")


def test_missing_data_path(capsys, pixart_teacher, tmp_path):
    code, captured = run(capsys, pixart_teacher, tmp_path / "nope", tmp_path / "run")
    assert_one_line_error(code, captured, "no such file")


def test_missing_caption_names_the_file(capsys, pixart_teacher, shapes_data, tmp_path):
    data = shutil.copytree(shapes_data, tmp_path / "data")
    (data / "0005.txt").unlink()
    code, captured = run(capsys, pixart_teacher, data, tmp_path / "run")
    assert_one_line_error(code, captured, "0005.png", "0005.txt", "--allow-missing-captions")
    code, captured = run(capsys, pixart_teacher, data, tmp_path / "run2", "--allow-missing-captions")
    assert code == 0, captured.err


def test_corrupt_image_is_skipped_and_counted(capsys, pixart_teacher, shapes_data, tmp_path):
    data = shutil.copytree(shapes_data, tmp_path / "data")
    (data / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, captured = run(capsys, pixart_teacher, data, tmp_path / "run")
    assert code == 0, captured.err
    assert "skipped 1 image(s)" in captured.err and "0003.png" in captured.err
    assert "1 image(s) skipped" in captured.out
    cache = json.loads((tmp_path / "run" / "cache" / "64px" / "cache.json").read_text())
    assert cache["count"] == 15 and len(cache["skipped"]) == 1


def test_resume_without_checkpoint(capsys, pixart_teacher, shapes_data, tmp_path):
    code, captured = run(capsys, pixart_teacher, shapes_data, tmp_path / "run", "--resume")
    assert_one_line_error(code, captured, "--resume", "no complete checkpoint")


def test_existing_run_without_resume_is_refused(capsys, pixart_teacher, shapes_data, tmp_path):
    assert run(capsys, pixart_teacher, shapes_data, tmp_path / "run")[0] == 0
    code, captured = run(capsys, pixart_teacher, shapes_data, tmp_path / "run")
    assert_one_line_error(code, captured, "already has checkpoints", "--resume")


def test_teacher_that_is_already_a_student(capsys, pixart_teacher, shapes_data, tmp_path):
    assert run(capsys, pixart_teacher, shapes_data, tmp_path / "run")[0] == 0
    code, captured = run(capsys, tmp_path / "run" / "student", shapes_data, tmp_path / "run2")
    assert_one_line_error(code, captured, "already a lit student")


@pytest.mark.parametrize("flag,value,fragment", [("--steps", "-1", "--steps"), ("--ema", "1.5", "--ema")])
def test_bad_numbers(capsys, pixart_teacher, shapes_data, tmp_path, flag, value, fragment):
    code, captured = run(capsys, pixart_teacher, shapes_data, tmp_path / "run", flag, value)
    assert_one_line_error(code, captured, fragment)
