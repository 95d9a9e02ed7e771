"""lit-export end to end on tiny models: bundles that load, match PyTorch, and bad input."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from litedge.bundle import is_bundle, verify_bundle
from litedge.cli.export import main
from litedge.models.configs import build_model
from litedge.models.student import save_transformer
from tests.models.test_linearize import forward_inputs, randomize


def _export(argv, capsys=None):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def _onnx_feed(model, kw):
    name = type(model).__name__
    feed = {"sample": kw["hidden_states"].numpy(), "timestep": kw["timestep"].float().numpy()}
    if name == "PixArtTransformer2DModel":
        feed["encoder_hidden_states"] = kw["encoder_hidden_states"].numpy()
        feed["encoder_attention_mask"] = np.ones(kw["encoder_hidden_states"].shape[:2], dtype=np.int64)
    elif name == "SD3Transformer2DModel":
        feed["encoder_hidden_states"] = kw["encoder_hidden_states"].numpy()
        feed["pooled_projections"] = kw["pooled_projections"].numpy()
    else:
        feed["class_labels"] = kw["class_labels"].numpy()
    return feed


@pytest.mark.parametrize("name", ["tiny-LiT-T2I-XL", "tiny-EDiT-PixArt-Sigma", "tiny-MM-EDiT-SD3.5-Medium"])
@pytest.mark.parametrize("weights", ["fp", "int4"])
def test_students_export_for_cpu_and_match_pytorch(name, weights, tmp_path, capsys):
    model = randomize(build_model(name), seed=2)
    save_transformer(model, tmp_path / "student")
    out = tmp_path / "m.litedge"
    code, err = _export([tmp_path / "student", "--target", "cpu", "--weights", weights, "-o", out], capsys)
    assert code == 0, err
    manifest = verify_bundle(out)
    meta = manifest.components["transformer"].meta
    assert meta["weights"] == weights

    # Run the bundle's graph at a size it was not traced at (non-square) against PyTorch.
    kw = forward_inputs(model, height=8, width=12)
    with torch.no_grad():
        ref = model(**kw).sample.numpy()
    session = ort.InferenceSession(str(out / manifest.components["transformer"].file), providers=["CPUExecutionProvider"])
    got = session.run(None, _onnx_feed(model, kw))[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    if weights == "fp":
        assert rel < 1e-4
        assert manifest.fidelity["transformer"]["rel_err"] < 1e-4
    else:
        assert meta["quantization"]["left_fp32"] == {}  # every linear layer, Gemm ones included
        assert 0 < rel < 0.3  # 4-bit random weights: reported, not hidden
        assert "linear layers int4" in err


def test_int4_transformer_is_at_most_a_fifth_of_fp32_when_linears_dominate(tmp_path, capsys):
    import diffusers

    from litedge.models.configs import get_config
    from litedge.models.linearize import LinearizeConfig, linearize_

    config = {**get_config("tiny-LiT-T2I-XL").teacher_config, "num_attention_heads": 4, "attention_head_dim": 64,
              "cross_attention_dim": 256}
    model = linearize_(diffusers.PixArtTransformer2DModel.from_config(config), LinearizeConfig("lit", heads=2))
    save_transformer(model, tmp_path / "wide")
    sizes = {}
    for weights in ("fp", "int4"):
        out = tmp_path / f"{weights}.litedge"
        assert _export([tmp_path / "wide", "--weights", weights, "-o", out], capsys)[0] == 0
        sizes[weights] = (out / "transformer.onnx").stat().st_size
    print("int4 / fp32 transformer size:", sizes["int4"] / sizes["fp"])
    assert sizes["int4"] <= 0.2 * sizes["fp"]


def test_random_weights_config_export(tmp_path, capsys):
    out = tmp_path / "r.litedge"
    code, err = _export(["--config", "tiny-LiT-S/2", "--random-weights", "--weights", "fp", "-o", out], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["model"]["task"] == "class-conditional"


def test_sampling_defaults_are_recorded(tmp_path, capsys):
    out = tmp_path / "d.litedge"
    argv = ["--config", "tiny-LiT-T2I-XL", "--random-weights", "--weights", "fp", "--steps", "3", "--guidance", "2.5"]
    assert _export([*argv, "-o", out], capsys)[0] == 0
    defaults = verify_bundle(out).defaults  # what the runtime takes when a request leaves them out
    assert defaults["steps"] == 3 and defaults["guidance_scale"] == 2.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "tiny-LiT-T2I-XL", "--random-weights", "--target", "tpu"], "unknown target 'tpu'"),
        (["--config", "tiny-LiT-T2I-XL", "--random-weights", "--sizes", "500"], "multiples of 16"),
        (["--config", "nope", "--random-weights"], "unknown config 'nope'"),
        (["--config", "tiny-LiT-T2I-XL"], "--random-weights go together"),
        (["--config", "tiny-LiT-T2I-XL", "--random-weights", "--steps", "0"], "default step count >= 1"),
        (["--config", "tiny-LiT-T2I-XL", "--random-weights", "--guidance", "-1"], "guidance scale >= 0"),
    ],
)
def test_bad_arguments_give_one_line(argv, message, tmp_path, capsys):
    code, err = _export([*argv, "-o", tmp_path / "x.litedge"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.litedge").exists()


def test_source_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, err = _export([tmp_path / "notes.txt", "-o", tmp_path / "x.litedge"], capsys)
    assert code == 2 and "unsupported file type" in err
    code, err = _export([tmp_path, "-o", tmp_path / "y.litedge"], capsys)
    assert code == 2 and "not a model directory" in err


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "b.litedge"
    base = ["--config", "tiny-LiT-T2I-XL", "--random-weights", "--weights", "fp", "-o", out]
    assert _export(base, capsys)[0] == 0
    code, err = _export(base, capsys)
    assert code == 2 and "--force" in err
    assert _export([*base, "--force"], capsys)[0] == 0 and is_bundle(out)


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _export(["--config", "tiny-LiT-T2I-XL", "--random-weights", "-o", blocker / "b.litedge"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_killed_export_leaves_no_bundle(tmp_path):
    """SIGKILL while the transformer is being exported: nothing loadable at OUT."""
    out = tmp_path / "k.litedge"
    proc = subprocess.Popen(
        [sys.executable, "-m", "litedge.cli.export", "--config", "tiny-MM-EDiT-SD3.5-Medium", "--random-weights",
         "-o", str(out)], stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr:  # wait until the export is under way
        if "parity check" in line:
            time.sleep(0.5)
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_bundle(out)
    assert not out.exists()
