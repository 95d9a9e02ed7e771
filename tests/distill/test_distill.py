"""distill(): a short run lowers the distillation loss, its checkpoints reload, every family trains."""

import json

import pytest
import torch

from litedge.distill import DistillConfig, distill
from litedge.distill.checkpoint import find_latest
from litedge.models.loading import load_model
from litedge.models.student import load_transformer
from tests.distill.fixtures import make_shapes_dataset, make_tiny_dit_pipeline

FAST = dict(resolution=64, batch=4, text_max_length=16, progress=False)


def pixart_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 16, model.config.caption_channels, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


@pytest.fixture(scope="module")
def lit_run(pixart_teacher, shapes_data, tmp_path_factory):
    """50 pure-distillation steps (the tiny teacher is random, so its eps is no task target)."""
    torch.set_num_threads(1)
    config = DistillConfig(teacher=str(pixart_teacher), family="lit", data=str(shapes_data),
                           out=str(tmp_path_factory.mktemp("run") / "lit"), steps=50, save_every=25, lr=3e-4,
                           task_weight=0.0, lambda_noise=1.0, **FAST)
    return distill(config)


def test_fifty_steps_lower_the_distillation_loss(lit_run):
    rows = json.loads((lit_run.run_dir / "losses.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, 51))
    noise = [r["noise"] for r in rows]
    assert sum(noise[-5:]) / 5 < 0.5 * sum(noise[:5]) / 5, noise
    assert {"task", "vlb", "var", "noise", "total"} <= set(rows[0])
    for name in ("losses.csv", "losses.png"):
        assert (lit_run.run_dir / name).stat().st_size > 0
    assert (lit_run.run_dir / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_transformer_reloads_with_the_same_output(lit_run):
    assert find_latest(lit_run.run_dir).name == "step-000050"
    loaded = load_transformer(lit_run.run_dir / "checkpoints" / "step-000050" / "transformer")
    student = lit_run.student.eval()
    kw = pixart_inputs(student)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, student(**kw).sample)
    ema = load_transformer(lit_run.run_dir / "checkpoints" / "step-000050" / "ema")
    with torch.no_grad():
        assert torch.equal(ema(**kw).sample, lit_run.ema(**kw).sample)


def test_student_pipeline_dir_is_loadable(lit_run, pixart_teacher):
    loaded = load_model(lit_run.student_dir)
    assert loaded.family == "lit" and loaded.pipeline_dir == lit_run.student_dir
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (lit_run.student_dir / part).exists(), part
    ema_sd, loaded_sd = lit_run.ema.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(ema_sd[k], loaded_sd[k]) for k in ema_sd)  # student/ gets the EMA weights


def test_edit_with_feature_distillation_and_frozen_inherited(pixart_teacher, shapes_data, tmp_path):
    result = distill(DistillConfig(teacher=str(pixart_teacher), family="edit", data=str(shapes_data),
                                   out=str(tmp_path / "edit"), steps=3, save_every=3, feature_weight=1.0,
                                   freeze_inherited_steps=3, ema=0.0, **FAST))
    assert result.losses["feature"] > 0 and all(map(lambda v: v == v, result.losses.values()))
    teacher = load_model(pixart_teacher).transformer
    t_sd = teacher.state_dict()
    for name, value in result.student.state_dict().items():  # inherited weights did not move
        if name in t_sd:
            assert torch.equal(value, t_sd[name]), name


def test_class_conditional_dit_from_class_folders(tmp_path):
    teacher = make_tiny_dit_pipeline(tmp_path / "dit")
    data = make_shapes_dataset(tmp_path / "classes", count=16, classes=True)
    result = distill(DistillConfig(teacher=str(teacher), family="lit", data=str(data), out=str(tmp_path / "run"),
                                   steps=2, save_every=2, precision="bf16", grad_checkpointing=True, **FAST))
    assert result.step == 2 and {"task", "vlb", "noise", "var"} <= set(result.losses)
    assert sorted(p.name for p in (result.student_dir).iterdir()) == ["model_index.json", "transformer", "vae"]


def test_sd3_mmedit_flow_from_a_prebuilt_cache(tmp_path):
    """SD3 text features come from a cache written in the documented format (three encoders
    are not cached by litedge yet); rectified-flow task + velocity + joint-attention features."""
    from safetensors.torch import save_file

    from litedge.models.configs import build_model
    from litedge.models.student import save_transformer

    teacher = build_model("tiny-MM-EDiT-SD3.5-Medium", teacher=True)
    save_transformer(teacher, tmp_path / "sd3")
    cache = tmp_path / "cache"
    cache.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(8, 16, 8, 8, generator=g),
               "encoder_hidden_states": torch.randn(8, 6, 32, generator=g),
               "pooled_projections": torch.randn(8, 24, generator=g)}, str(cache / "shard-00000.safetensors"))
    (cache / "cache.json").write_text(json.dumps({
        "format": "litedge-feature-cache", "version": 1, "count": 8, "resolution": 64,
        "keys": ["encoder_hidden_states", "latents", "pooled_projections"]}))
    result = distill(DistillConfig(teacher=str(tmp_path / "sd3"), family="mmedit", data=str(cache),
                                   out=str(tmp_path / "run"), steps=2, save_every=2, feature_weight=0.5, **FAST))
    assert {"task", "noise", "feature"} <= set(result.losses) and "vlb" not in result.losses
    assert load_transformer(result.student_dir / "transformer") is not None


def test_progressive_resolution_resume_recaches(pixart_teacher, shapes_data, tmp_path):
    out = tmp_path / "run"
    base = dict(teacher=str(pixart_teacher), family="lit", data=str(shapes_data), out=str(out), save_every=2,
                batch=4, text_max_length=16, progress=False)
    distill(DistillConfig(resolution=64, steps=2, **base))
    result = distill(DistillConfig(resolution=128, steps=4, resume=True, **base))
    assert result.step == 4 and (out / "cache" / "128px" / "cache.json").is_file()
    assert [r["step"] for r in json.loads((out / "losses.json").read_text())] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["config"]["resolution"] == 128


def test_run_exports_with_lit_export_and_generates_with_lit_generate(lit_run, tmp_path):
    """The distilled student pipeline goes through lit-export (int4) and lit-generate unchanged."""
    from litedge.cli.export import main as export_main
    from litedge.cli.generate import main as generate_main

    bundle, image = tmp_path / "student.litedge", tmp_path / "out.png"
    assert export_main([str(lit_run.student_dir), "--target", "cpu", "--weights", "int4", "-o", str(bundle)]) == 0
    assert generate_main(["a red square", "--bundle", str(bundle), "--size", "64", "--steps", "3",
                          "--quiet", "-o", str(image)]) == 0
    from PIL import Image

    with Image.open(image) as png:
        assert png.size == (64, 64) and "a red square" in png.text["litedge"]


def test_cache_is_rebuilt_when_the_teachers_encoders_change(pixart_teacher, shapes_data, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher, out = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(pixart_teacher, teacher)
    base = dict(teacher=str(teacher), family="lit", data=str(shapes_data), out=str(out), save_every=1, **FAST)
    index = out / "cache" / "64px" / "cache.json"

    def features():
        shard = sorted(index.parent.glob("*.safetensors"))[0]
        return load_file(shard)["encoder_hidden_states"]

    distill(DistillConfig(steps=1, **base))
    first, first_meta = features(), index.read_text()
    distill(DistillConfig(steps=2, resume=True, **base))
    assert index.read_text() == first_meta  # same encoders: the cache is reused
    weights = next((teacher / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v * 1.5 for k, v in state.items()}, str(weights), metadata={"format": "pt"})  # a retrained encoder
    distill(DistillConfig(steps=3, resume=True, **base))
    assert json.loads(index.read_text())["encoders"] != json.loads(first_meta)["encoders"]
    assert not torch.allclose(features(), first)  # features of the new encoder, not the stale ones
