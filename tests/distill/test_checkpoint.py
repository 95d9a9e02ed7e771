"""Checkpoints: atomic layout, what find_latest trusts, RNG round trip."""

import json

import torch

from litedge.distill.checkpoint import find_latest, load_checkpoint, save_checkpoint
from litedge.models.configs import build_model


def saved_run(tmp_path, steps=(5, 10)):
    model = build_model("tiny-LiT-T2I-XL")
    opt = torch.optim.AdamW(model.parameters())
    for step in steps:
        save_checkpoint(tmp_path, step, model, None, opt, {"config": {"family": "lit"}})
    return model, opt


def test_latest_points_at_the_newest_complete_checkpoint(tmp_path):
    saved_run(tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000010"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000005", "step-000010"]
    assert find_latest(tmp_path) == root / "step-000010"


def test_partial_checkpoints_are_never_chosen(tmp_path):
    saved_run(tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000015-abc").mkdir()  # a save killed before its rename
    (root / ".tmp-step-000015-abc" / "state.json").write_text("{}")
    assert find_latest(tmp_path).name == "step-000010"
    (root / "latest").write_text("step-000020")  # a pointer to something that is not there
    assert find_latest(tmp_path).name == "step-000010"
    (root / "step-000010" / "optimizer.pt").unlink()  # damaged by hand: fall back further
    assert find_latest(tmp_path).name == "step-000005"
    (root / "latest").write_text("../../etc")
    assert find_latest(tmp_path).name == "step-000005"


def test_no_checkpoint(tmp_path):
    assert find_latest(tmp_path) is None


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(7)
    model, opt = saved_run(tmp_path, steps=(1,))
    expected = torch.rand(3)
    other = build_model("tiny-LiT-T2I-XL", seed=5)
    opt2 = torch.optim.AdamW(other.parameters())
    state = load_checkpoint(tmp_path / "checkpoints" / "step-000001", other, None, opt2)
    assert state["step"] == 1 and state["config"] == {"family": "lit"}
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    json.dumps(state)  # RNG states are plain lists
