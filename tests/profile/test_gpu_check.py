"""bench/gpu_check.sh --dry-run: the GPU check's every step, on the CPU EP with tiny bundles."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "install" not in out  # a dry run changes nothing on the machine
    assert out.count("exported tiny") >= 2 and out.count("(ok, limit") == 2
    assert "io_binding True" not in out  # the CPU EP runs unbound; CUDA binds (tests/runtime)
    assert "step 64 px on cpu" in out and "step 128 px on cpu" in out and "teacher / student" in out
    for bundle in ("tiny-LiT-T2I-XL-student-fp-cuda.litedge", "tiny-LiT-T2I-XL-teacher-fp-cuda.litedge"):
        assert (tmp_path / bundle / "manifest.json").is_file()
