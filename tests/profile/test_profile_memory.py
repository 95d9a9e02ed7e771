"""lit-profile holds one session at a time, says 'out of memory' in one line, and breaks a
softmax teacher's chunked attention (an ONNX Loop) down as self-attention, counted once."""

import gc
import weakref

import onnxruntime as ort
import pytest

from litedge.cli.profile import main
from litedge.export.bundle_export import ExportConfig, export_bundle
from litedge.profile import measure
from litedge.profile.measure import profile_bundle


@pytest.fixture(scope="module")
def student_and_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    student, teacher = root / "student.litedge", root / "teacher.litedge"
    export_bundle(ExportConfig(out=student, config_name="tiny-LiT-T2I-XL", weights="fp"))
    export_bundle(ExportConfig(out=teacher, config_name="tiny-LiT-T2I-XL", weights="fp", teacher=True))
    return student, teacher


def test_ops_releases_the_timing_session_before_the_profiling_one(student_and_teacher, monkeypatch):
    live: list[weakref.ref] = []
    most = [0]
    real = ort.InferenceSession

    class Counted(real):
        def __init__(self, *args, **kwargs):
            gc.collect()
            alive = sum(r() is not None for r in live)
            most[0] = max(most[0], alive + 1)
            super().__init__(*args, **kwargs)
            live.append(weakref.ref(self))

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    monkeypatch.setattr(measure.ort, "InferenceSession", Counted)
    profile = profile_bundle(student_and_teacher[0], [(64, 64), (128, 128)], repeat=1, steps=1, device="cpu", ops=True)
    assert most[0] == 1  # never two sessions (and never two transformers) at once
    stats = profile.sizes[1].op_stats
    assert stats["groups"]["mlp"]["gflop"] > 0 and stats["groups"]["mlp"]["gflops"] > 0
    assert profile.sizes[1].op_groups == {g: s["seconds"] for g, s in stats["groups"].items()}


def test_out_of_memory_is_one_line(student_and_teacher, monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                           "running MatMul node. Failed to allocate memory for requested buffer of size 34359738368")

    monkeypatch.setattr(measure, "_time_runs", no_memory)
    assert main([str(student_and_teacher[1]), "--sizes", "64", "--repeat", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert ": out of memory" in errors[0] and "--teacher" in errors[0]  # the first component timed says so


def test_other_errors_keep_their_traceback(student_and_teacher, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("an unrelated bug")

    monkeypatch.setattr(measure, "_time_runs", bug)
    with pytest.raises(RuntimeError, match="unrelated bug"):
        profile_bundle(student_and_teacher[1], [(64, 64)], repeat=1, device="cpu")


def test_teacher_loop_is_self_attention_counted_once(student_and_teacher):
    profile = profile_bundle(student_and_teacher[1], [(128, 128)], repeat=2, steps=1, device="cpu", ops=True)
    stats = profile.sizes[0].op_stats
    groups = stats["groups"]
    assert groups["self-attention"]["seconds"] > 0 and "Loop" in stats["op_types"]
    assert "Softmax" in stats["op_types"]  # the cross-attention's; the Loop body's are inside the Loop
    kernels = sum(g["seconds"] for g in groups.values())
    assert 0.5 * stats["run_seconds"] < kernels <= stats["run_seconds"]  # the Loop body is not counted twice
