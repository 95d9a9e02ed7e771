"""torchrun --nproc_per_node 2 (gloo, CPU): DDP keeps both ranks' students identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import hashlib, json, os, sys
import torch
from litedge.distill import DistillConfig, distill
teacher, data, out = sys.argv[1:4]
torch.set_num_threads(1)
result = distill(DistillConfig(teacher=teacher, family="lit", data=data, out=out, resolution=64, batch=2, steps=4,
                               save_every=2, text_max_length=16, lr=1e-3, progress=False, device="cpu"))
digest = hashlib.sha256()
for name, value in sorted(result.student.state_dict().items()):
    digest.update(name.encode()); digest.update(value.detach().contiguous().numpy().tobytes())
rank = int(os.environ["RANK"])
Path = __import__("pathlib").Path
(Path(out) / f"rank-{rank}.json").write_text(json.dumps({"sha256": digest.hexdigest(), "loss": result.losses["total"],
                                                         "world": int(os.environ["WORLD_SIZE"])}))
"""


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(pixart_teacher, shapes_data, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(pixart_teacher), str(shapes_data), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank saw its own shard of the data
    assert (out / "checkpoints" / "step-000004" / "transformer").is_dir() and (out / "student").is_dir()
