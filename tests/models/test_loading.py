"""load_model(): one entry point for diffusers directories, safetensors and original .pth files."""

import pickle

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from litedge.errors import LitedgeError
from litedge.models.configs import build_model
from litedge.models.loading import load_model
from litedge.models.original_checkpoints import diffusers_pixart_to_original
from litedge.models.student import save_transformer
from tests.models.test_linearize import forward_inputs, randomize


@pytest.fixture
def pixart(tmp_path):
    """A tiny PixArt-Sigma saved by diffusers' own save_pretrained, with random weights everywhere."""
    model = randomize(build_model("tiny-LiT-T2I-XL", teacher=True), seed=3)
    model.save_pretrained(tmp_path / "pixart")
    return model, tmp_path / "pixart"


def _same_forward(a, b):
    kw = forward_inputs(a, height=8, width=12)
    with torch.no_grad():
        return torch.equal(a(**kw).sample, b(**kw).sample)


def test_diffusers_directory_and_original_pth_give_identical_forward(pixart, tmp_path):
    model, directory = pixart
    loaded = load_model(directory)
    assert loaded.kind == "pixart" and loaded.family == "softmax"
    assert _same_forward(model, loaded.transformer)

    # The same weights in the original PixArt layout, nested as PixArt's training saves them.
    pos = model.pos_embed.pos_embed.clone()
    original = diffusers_pixart_to_original(model.state_dict(), extras={"pos_embed": pos})
    assert "blocks.0.attn.qkv.weight" in original and "t_block.1.weight" in original
    torch.save({"state_dict": original, "state_dict_ema": original}, tmp_path / "pixart.pth")
    from_pth = load_model(tmp_path / "pixart.pth", num_heads=model.config.num_attention_heads)
    assert isinstance(from_pth.transformer, PixArtTransformer2DModel)
    assert _same_forward(model, from_pth.transformer)


def test_pipeline_directory_with_student(tmp_path):
    student = randomize(build_model("tiny-EDiT-PixArt-Sigma"), seed=4)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    save_transformer(student, tmp_path / "pipe" / "transformer")
    loaded = load_model(tmp_path / "pipe")
    assert loaded.family == "edit" and loaded.pipeline_dir == tmp_path / "pipe"
    assert _same_forward(student, loaded.transformer)


def test_single_safetensors_with_named_config(tmp_path):
    from safetensors.torch import save_file

    model = randomize(build_model("tiny-LiT-T2I-XL"), seed=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "student.safetensors"))
    loaded = load_model(tmp_path / "student.safetensors", config="tiny-LiT-T2I-XL")
    assert loaded.family == "lit"
    assert _same_forward(model, loaded.transformer)


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_with_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f)
    with pytest.raises(LitedgeError) as err:
        load_model(tmp_path / "evil.pth")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_missing_path():
    with pytest.raises(LitedgeError, match="no such file or directory"):
        load_model("/nonexistent/model.pth")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(LitedgeError, match="not a model directory"):
        load_model(tmp_path)


def test_unknown_config_name(tmp_path, pixart):
    model, _ = pixart
    torch.save(diffusers_pixart_to_original(model.state_dict()), tmp_path / "m.pth")
    with pytest.raises(LitedgeError, match="neither a named config"):
        load_model(tmp_path / "m.pth", config="LiT-XXL")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    model = build_model("tiny-LiT-T2I-XL")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("proj_out.weight")
    state["caption_projection.linear_1.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(LitedgeError) as err:
        load_model(tmp_path / "broken.safetensors", config="tiny-LiT-T2I-XL")
    message = str(err.value)
    assert "1 missing (proj_out.weight)" in message and "misshapen" in message and "caption_projection" in message
    assert "\n" not in message


def test_student_directory_with_bad_heads_in_config(tmp_path):
    student = build_model("tiny-LiT-T2I-XL")
    save_transformer(student, tmp_path / "t")
    config = (tmp_path / "t" / "config.json").read_text().replace('"heads": 2', '"heads": 3')
    (tmp_path / "t" / "config.json").write_text(config)
    with pytest.raises(LitedgeError, match="heads=3 does not divide the model width 64"):
        load_model(tmp_path / "t")
