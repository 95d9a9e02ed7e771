"""SIGKILL mid-run + --resume replays the uninterrupted run bit for bit; partial checkpoints never load."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from litedge.distill import DistillConfig, distill
from litedge.distill.checkpoint import find_latest
from litedge.models.student import WEIGHTS_NAME

STEPS, EVERY = 40, 5
REPO = Path(__file__).resolve().parents[2]


def config(teacher, data, out, resume=False):
    return DistillConfig(teacher=str(teacher), family="lit", data=str(data), out=str(out), resolution=64, batch=4,
                         steps=STEPS, save_every=EVERY, text_max_length=16, lr=1e-3, seed=3, resume=resume,
                         deterministic=True, progress=False)


def cli_args(cfg):
    return ["--teacher", cfg.teacher, "--family", cfg.family, "--data", cfg.data, "--out", cfg.out,
            "--resolution", "64", "--batch", "4", "--steps", str(STEPS), "--save-every", str(EVERY),
            "--text-max-length", "16", "--lr", "1e-3", "--seed", "3", "--deterministic", "--no-progress"]


def weights(run_dir, step, part="transformer"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / part / WEIGHTS_NAME))


def test_sigkill_then_resume_matches_the_uninterrupted_run(pixart_teacher, shapes_data, tmp_path):
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        distill(config(pixart_teacher, shapes_data, tmp_path / "straight"))

        killed = config(pixart_teacher, shapes_data, tmp_path / "killed")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.Popen([sys.executable, "-m", "litedge.cli.distill", *cli_args(killed)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        latest = tmp_path / "killed" / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-500:]}"
        reached = find_latest(tmp_path / "killed")
        assert reached is not None and int(reached.name.split("-")[1]) < STEPS

        distill(config(pixart_teacher, shapes_data, tmp_path / "killed", resume=True))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for part in ("transformer", "ema"):
        a, b = weights(tmp_path / "straight", STEPS, part), weights(tmp_path / "killed", STEPS, part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    opt_a = torch.load(tmp_path / "straight/checkpoints/step-000040/optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "killed/checkpoints/step-000040/optimizer.pt", weights_only=True)
    assert all(torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"]) for i in opt_a["state"])
