"""diffusers' own from_pretrained on a litedge student folder builds the student, never softmax.

Reference: litedge's ``load_transformer`` of the same folder (the student as litedge trains,
exports and checks it). Each tiny pipeline is written the way users get one: the fixtures'
pipeline builder, then the model_index.json that litedge writes for a student.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from litedge.models.linearize import STUDENT_CLASS_NAMES, linearize_config_of
from litedge.models.student import load_transformer, save_transformer, student_model_index
from tests.models.test_linearize import forward_inputs
from tests.runtime.fixtures import make_tiny_dit_pipeline, make_tiny_pixart_pipeline, make_tiny_sd3_pipeline


def _student_pipeline(kind: str, out):
    """A tiny student pipeline folder whose model_index.json names the litedge class."""
    if kind == "pixart":
        make_tiny_pixart_pipeline(out, linear=True)
    elif kind == "sd3":
        make_tiny_sd3_pipeline(out, linear=True)
    else:
        make_tiny_dit_pipeline(out)
        (out / "model_index.json").write_text(json.dumps({
            "_class_name": "DiTPipeline", "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(student_model_index(index, load_transformer(out / "transformer"))))
    return out


@pytest.fixture(scope="module", params=["pixart", "sd3", "dit"])
def student_pipeline(request, tmp_path_factory):
    return request.param, _student_pipeline(request.param, tmp_path_factory.mktemp(request.param) / "pipe")


def test_student_folder_names_the_litedge_class(student_pipeline):
    kind, folder = student_pipeline
    config = json.loads((folder / "transformer" / "config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    assert config["_class_name"] in STUDENT_CLASS_NAMES.values()
    assert index["transformer"] == ["litedge", config["_class_name"]]
    assert config["litedge"]["family"] == {"pixart": "lit", "sd3": "mmedit", "dit": "lit"}[kind]


def test_diffusion_pipeline_from_pretrained_runs_the_student(student_pipeline):
    import diffusers

    import litedge  # noqa: F401  (diffusers resolves the "litedge" library from sys.modules)

    kind, folder = student_pipeline
    reference = load_transformer(folder / "transformer")
    loaders = [diffusers.DiffusionPipeline]
    if kind == "pixart":
        loaders.append(diffusers.PixArtSigmaPipeline)
    for loader in loaders:
        pipe = loader.from_pretrained(folder)
        model = pipe.transformer.eval()
        assert type(model).__name__ == STUDENT_CLASS_NAMES[type(reference).__name__]
        assert isinstance(model, type(reference))  # a subclass of the teacher's diffusers class
        assert linearize_config_of(model) == linearize_config_of(reference)
        kw = forward_inputs(reference, height=8, width=12, seed=5)  # chosen by the reference's diffusers class
        with torch.no_grad():
            want = reference(**kw).sample
            got = model(**kw).sample
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-6, (loader.__name__, rel)


def test_pixart_pipeline_images_equal_litedge_transformer_in_diffusers(student_pipeline):
    """The whole diffusers pipeline: loaded from the folder == assembled around litedge's student."""
    import diffusers

    import litedge  # noqa: F401
    from tests.runtime.fixtures import diffusers_pipeline

    kind, folder = student_pipeline
    if kind != "pixart":
        pytest.skip("one end-to-end pipeline run is enough: PixArt-Sigma")
    run = dict(prompt="a red fox", num_inference_steps=2, height=32, width=32, output_type="np", use_resolution_binning=False,
               max_sequence_length=24)
    loaded = diffusers.PixArtSigmaPipeline.from_pretrained(folder)
    got = loaded(**run, generator=torch.Generator().manual_seed(0)).images
    want = diffusers_pipeline(folder)(**run, generator=torch.Generator().manual_seed(0)).images
    assert abs(got - want).max() < 1e-6


def test_without_litedge_diffusers_fails_naming_litedge(student_pipeline):
    """Not imported, or not importable: an error that names litedge, never random softmax weights.

    One subprocess (imports cost seconds) checks, in order: ``import litedge`` loads no torch;
    diffusers without litedge imported, then with it unimportable, raises naming it; once
    imported, ``litedge.<Class>`` resolves lazily to the diffusers subclass.
    """
    kind, folder = student_pipeline
    if kind != "pixart":
        pytest.skip("the loader's error does not depend on the family")
    script = textwrap.dedent(f"""
        import sys
        import litedge
        assert "torch" not in sys.modules and "diffusers" not in sys.modules, "import litedge is not torch-free"
        for name in [m for m in sys.modules if m.split(".")[0] == "litedge"]:
            del sys.modules[name]
        from diffusers import DiffusionPipeline, SD3Transformer2DModel
        for blocked in (False, True):
            if blocked:
                sys.modules["litedge"] = None  # import litedge raises ImportError
            try:
                DiffusionPipeline.from_pretrained({str(folder)!r})
            except Exception as exc:
                print("ERROR", type(exc).__name__, str(exc).replace("\\n", " "))
            else:
                print("LOADED")
        del sys.modules["litedge"]
        import litedge
        assert issubclass(litedge.LitedgeSD3Transformer2DModel, SD3Transformer2DModel)
        print("lazy ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "lazy ok" in done.stdout, done.stdout + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ERROR", "LOADED"))]
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith("ERROR") and "litedge" in line, line


def test_a_diffusers_loaded_student_round_trips_through_both_savers(tmp_path):
    import diffusers

    import litedge  # noqa: F401
    from litedge.models.student_classes import LitedgePixArtTransformer2DModel

    folder = _student_pipeline("pixart", tmp_path / "pipe")
    reference = load_transformer(folder / "transformer")
    model = diffusers.DiffusionPipeline.from_pretrained(folder).transformer.eval()
    model.save_pretrained(tmp_path / "by-diffusers")  # diffusers' own writer on the litedge class
    save_transformer(model, tmp_path / "by-litedge")
    kw = forward_inputs(reference, height=8, width=8)
    with torch.no_grad():
        want = reference(**kw).sample
        for saved in ("by-diffusers", "by-litedge"):
            assert torch.equal(load_transformer(tmp_path / saved)(**kw).sample, want), saved
            again = LitedgePixArtTransformer2DModel.from_pretrained(tmp_path / saved).eval()
            assert torch.equal(again(**kw).sample, want), saved


def test_old_student_folders_still_load(tmp_path):
    """Folders written before the litedge classes: the teacher's class name plus ``_litedge``."""
    from litedge.models.configs import build_model
    from tests.models.test_linearize import randomize

    student = randomize(build_model("tiny-EDiT-PixArt-Sigma"), seed=4).eval()
    save_transformer(student, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config["_class_name"] = "PixArtTransformer2DModel"
    config["_litedge"] = config.pop("litedge")
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    loaded = load_transformer(tmp_path / "t")
    assert linearize_config_of(loaded) == linearize_config_of(student)
    kw = forward_inputs(student, height=8, width=8)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, student(**kw).sample)


def test_student_class_needs_its_linear_attention_config():
    from litedge.errors import LitedgeError
    from litedge.models.configs import get_config
    from litedge.models.student_classes import LitedgePixArtTransformer2DModel

    config = get_config("tiny-LiT-T2I-XL").teacher_config
    with pytest.raises(LitedgeError, match="needs its linear-attention config"):
        LitedgePixArtTransformer2DModel(**config)
    model = LitedgePixArtTransformer2DModel(**config, litedge={"family": "lit"})
    assert model.config.litedge["heads"] == 2  # resolved and recorded
