"""The demo build (litedge.demo.build): every stage end to end on the tiny preset, resume, ship."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from litedge.demo import build as B
from litedge.demo.shapes import CATEGORIES
from litedge.errors import LitedgeError


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: on a shared 2-core machine two threads can be 30x slower for these tiny convs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory, single_thread) -> Path:
    """``python -m litedge.demo.build all --tiny`` in a tmp workdir, shipping to a tmp folder."""
    root = tmp_path_factory.mktemp("demo")
    argv = ["all", "--workdir", str(root / "work"), "--tiny", "--ship-to", str(root / "ship"), "--no-progress"]
    assert B.main(argv) == 0
    return root


def _cfg(root: Path, **kw) -> B.BuildConfig:
    return B.BuildConfig(workdir=root / "work", preset="tiny", ship_to=root / "ship", progress=False, **kw)


def test_every_stage_done(built):
    paths = B.Paths(built / "work")
    for stage in B.STAGES:
        done = json.loads(paths.done(stage).read_text())
        assert done["stage"] == stage and done["stage_seconds"] >= 0
    teacher = json.loads(paths.done("teacher").read_text())
    assert teacher["steps"] == 5 and [ph["size"] for ph in teacher["phases"]] == [64, 128]
    assert sum(ph["steps"] for ph in teacher["phases"]) == 5
    vae = json.loads(paths.done("vae").read_text())
    assert vae["factor"] == 32 and vae["latent_channels"] == 8 and vae["scaling_factor"] > 0
    student = json.loads(paths.done("student").read_text())
    assert [(ph["size"], ph["until_step"]) for ph in student["phases"]] == [(64, 2), (128, 3)] and student["steps"] == 3
    assert (paths.run("student") / "cache" / "128px").is_dir()  # the second phase distilled at its own size
    text = json.loads(paths.done("text").read_text())
    assert set(text["accuracy"]) == {"train", "eval"}


def test_pipelines_load_with_project_loaders(built):
    from diffusers import AutoencoderDC

    from litedge.models.loading import load_model

    work = built / "work"
    teacher, student = load_model(work / "teacher"), load_model(work / "student")
    assert teacher.family == "softmax" and teacher.kind == "pixart"
    assert student.family == "lit" and student.linear.heads == 2
    assert teacher.transformer.config.patch_size ** 2 * teacher.transformer.config.in_channels <= \
        teacher.transformer.config.num_attention_heads * teacher.transformer.config.attention_head_dim
    vae = AutoencoderDC.from_pretrained(work / "vae")
    assert vae.config.scaling_factor == pytest.approx(json.loads((work / "vae" / "done.json").read_text())["scaling_factor"])
    assert (built / "ship" / "shapes-lit" / "model_index.json").is_file()
    assert load_model(built / "ship" / "shapes-lit").family == "lit"
    assert load_model(built / "ship" / "shapes-teacher-transformer").family == "softmax"


@pytest.mark.parametrize("name", [*B.BUNDLES, "shipped"])
def test_bundles_generate(built, name):
    from litedge.runtime import Pipeline

    path = built / "ship" / "shapes-lit.litedge" if name == "shipped" else B.Paths(built / "work").bundle(name)
    pipe = Pipeline.from_bundle(path, device="cpu")
    assert pipe.manifest.model["vae_scale_factor"] == 32 and pipe.manifest.model["trained_sizes"] == [64, 128]
    image = pipe("a red circle", height=128, width=128, steps=2, seed=0, progress=False)[0]
    assert image.size == (128, 128)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_eval_json_has_every_category(built):
    report = json.loads((built / "work" / "eval.json").read_text())
    assert set(report["models"]) == set(B.BUNDLES)
    for name, result in report["models"].items():
        for size in ("64", "128"):  # the tiny preset's eval sizes
            assert set(result[size]["shapes_eval"]["per_category"]) == set(CATEGORIES), name
            assert result[size]["size"] == int(size)
        assert result["latency"]["sizes"], name
    assert set(report["checks"]) and isinstance(report["target_met"], bool)
    assert (built / "work" / "samples.png").stat().st_size > 0


def test_tokenizer_matches_runtime(built):
    """The tokenizer the teacher trained with and the runtime's reader of tokenizer.json give the same ids."""
    from transformers import AutoTokenizer

    from litedge.demo.training import tokenize
    from litedge.runtime.text import PromptTokenizer

    bundle = B.Paths(built / "work").bundle("student-int4")
    runtime = PromptTokenizer.from_bundle(bundle, {"kind": "tokenizers", "path": "tokenizer"}, max_length=16)
    trained = AutoTokenizer.from_pretrained(built / "work" / "teacher" / "tokenizer")
    prompts = ["a red circle to the left of a blue square", "three green triangles", ""]
    ids, mask = tokenize(trained, prompts, 16)
    r_ids, r_mask = runtime(prompts)
    np.testing.assert_array_equal(r_ids, ids.numpy())
    np.testing.assert_array_equal(r_mask, mask.numpy())
    assert 2 not in ids[:2].tolist()  # no <unk>: the vocabulary covers the grammar


def test_done_stages_are_skipped(built):
    before = B.Paths(built / "work").done("teacher").read_text()
    figures = B.build(_cfg(built), "all")
    assert set(figures) == set(B.STAGES)
    assert B.Paths(built / "work").done("teacher").read_text() == before


def test_teacher_resume_continues_its_step_count(built, tmp_path):
    src, work = built / "work", tmp_path / "work"
    for part in ("data", "vae", "text", "teacher", "runs/teacher"):
        shutil.copytree(src / part, work / part)
    (work / "student").mkdir()
    (work / "student" / "done.json").write_text("{}")
    cfg = lambda **kw: B.BuildConfig(workdir=work, preset="tiny", progress=False, steps=7, **kw)  # noqa: E731
    assert B.run_stage(cfg(), "teacher")["steps"] == 5  # done: kept without --resume
    figures = B.run_stage(cfg(resume=True), "teacher")
    assert figures["start_step"] == 5 and figures["new_steps"] == 2 and figures["steps"] == 7
    first = json.loads((src / "teacher" / "done.json").read_text())["train_seconds"]
    assert figures["train_seconds"] == pytest.approx(first + figures["seconds"], abs=0.5)  # both runs counted
    rows = [json.loads(line) for line in (work / "runs" / "teacher" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert (work / "runs" / "teacher" / "checkpoints" / "latest").read_text() == "step-000007"
    assert not (work / "student" / "done.json").exists()  # the student depends on the teacher: redo it
    (work / "teacher" / "done.json").unlink()
    with pytest.raises(LitedgeError, match="--resume"):  # checkpoints there, no --resume
        B.run_stage(cfg(), "teacher")


def test_ship_refuses_over_the_size_limit(built, tmp_path, monkeypatch):
    monkeypatch.setattr(B, "SHIP_LIMIT_BYTES", 1000)
    cfg = B.BuildConfig(workdir=built / "work", preset="tiny", ship_to=tmp_path / "ship", progress=False)
    with pytest.raises(LitedgeError, match="25 MB"):
        B.stage_ship(cfg, B.Paths(built / "work"))


def test_missing_stage_is_named(tmp_path):
    with pytest.raises(LitedgeError, match="stage 'data' is not done"):
        B.run_stage(B.BuildConfig(workdir=tmp_path, preset="tiny", progress=False), "vae")


def test_eval_computes_only_the_selected_parts(built, tmp_path):
    src, work = built / "work", tmp_path / "work"
    for part in ("data", "bundles"):  # bundles/ holds the export stage's done.json
        shutil.copytree(src / part, work / part)
    cfg = B.BuildConfig(workdir=work, preset="tiny", progress=False, eval_prompts=5, eval_sizes=(64,),
                        eval_bundles=("student-int4",), latency=False, grid=False)
    figures = B.stage_eval(cfg, B.Paths(work))
    assert figures["overall"]["student-int4"].keys() == {"64"} and figures["overall"]["teacher-fp32"] == {}
    assert figures["checks"]["student_within_0.05_of_teacher"] is None  # its parts were not computed
    assert sorted(p.name for p in (work / "eval").iterdir()) == ["student-int4-64.json"]
    report = json.loads((work / "eval.json").read_text())
    assert report["target_met"] is False and report["settings"]["prompts"]["student-int4"] == {"64": 5}


def test_teacher_warm_starts_from_a_saved_transformer(built, tmp_path):
    import torch
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file

    from litedge.demo import training as T

    src, work = built / "work", tmp_path / "work"
    for part in ("data", "vae", "text"):
        shutil.copytree(src / part, work / part)
    saved = PixArtTransformer2DModel.from_pretrained(src / "teacher" / "transformer")
    with torch.no_grad():  # weights far from the preset's seeded init
        for param in saved.parameters():
            param.add_(0.5)
    saved.save_pretrained(tmp_path / "saved")
    B.run_stage(B.BuildConfig(workdir=work, preset="tiny", progress=False, steps=1, init_teacher=tmp_path / "saved"),
                "teacher")
    start = load_file(next((tmp_path / "saved").glob("*.safetensors")))
    after = load_file(next((work / "teacher" / "transformer").glob("*.safetensors")))
    assert max(float((after[k] - start[k]).abs().max()) for k in start) < 0.05  # one small step from them
    with pytest.raises(LitedgeError, match="--init-teacher"):
        B._warm_start(T.make_teacher(T.PRESETS["tiny"]), tmp_path)
