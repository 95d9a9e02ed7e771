"""The PNG ``parameters`` chunk (the form image UIs read and write) beside litedge's JSON."""

import json

import numpy as np
from PIL import Image, PngImagePlugin

from litedge.runtime import Pipeline, read_metadata, save_png
from litedge.runtime.image import format_parameters, parse_parameters, to_pil


def _image(meta: dict) -> Image.Image:
    return to_pil(np.zeros((1, 3, 16, 24), np.float32), [meta])[0]


def _only_parameters(path, text: str):
    """A PNG as an image UI writes it: a ``parameters`` text chunk and no litedge JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_generated_png_carries_both_chunks(pixart_bundle, tmp_path):
    pipe = Pipeline.from_bundle(pixart_bundle, device="cpu")
    image = pipe("a red fox", negative_prompt="blurry", num_inference_steps=2, generator=3, guidance_scale=3.0,
                 height=64, width=96, progress=False)[0]
    path = save_png(image, tmp_path / "fox.png")
    with Image.open(path) as back:
        params, meta = back.info["parameters"], json.loads(back.info["litedge"])
    assert params == ("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 3, Seed: 3, "
                      "Size: 96x64, Model: pixart")
    assert read_metadata(path) == meta and meta["sampler"] == "DPM++ 2M"


def test_parameters_round_trip_without_the_litedge_chunk(tmp_path):
    meta = {"prompt": "a red fox, in the snow\nat dusk", "negative_prompt": "blurry, dark", "steps": 20,
            "guidance_scale": 4.5, "seed": 7, "height": 64, "width": 96, "sampler": "Euler a",
            "scheduler": "euler-ancestral", "bundle": "shapes: lit.litedge"}
    text = format_parameters(meta)
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: Euler a, CFG scale: 4.5, Seed: 7, Size: 96x64, '
                                     'Model: "shapes: lit"')  # a value holding a separator is quoted
    back = read_metadata(_only_parameters(tmp_path / "ui.png", text))
    assert {k: back[k] for k in meta if k != "bundle"} == {k: v for k, v in meta.items() if k != "bundle"}
    assert back["model"] == "shapes: lit" and back["parameters"] == text


def test_reads_what_an_image_ui_wrote(tmp_path):
    text = ("masterpiece, a castle\nNegative prompt: lowres, bad anatomy\nSteps: 30, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
            'Model: v1-5, Lora hashes: "detail: 1a2b, style: 3c4d", Version: v1.10.1')
    meta = read_metadata(_only_parameters(tmp_path / "a1111.png", text))
    assert meta["prompt"] == "masterpiece, a castle" and meta["negative_prompt"] == "lowres, bad anatomy"
    assert (meta["steps"], meta["guidance_scale"], meta["seed"]) == (30, 7.0, 1234)
    assert (meta["width"], meta["height"], meta["model"]) == (512, 768, "v1-5")
    assert meta["scheduler"] == "dpmsolver++" and meta["Schedule type"] == "Karras"
    assert meta["Lora hashes"] == "detail: 1a2b, style: 3c4d" and meta["Version"] == "v1.10.1"
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "parameters": "just a prompt"}


def test_non_latin1_prompt_and_no_negative(tmp_path):
    meta = {"prompt": "一只红狐狸 🦊", "negative_prompt": "", "steps": 4, "guidance_scale": 1.0, "seed": 0,
            "height": 16, "width": 24, "sampler": "UniPC", "bundle": "x.litedge"}
    path = save_png(_image(meta), tmp_path / "zh.png")
    with Image.open(path) as back:
        params = back.info["parameters"]  # Pillow stored it as iTXt: not Latin-1
    assert params.splitlines() == ["一只红狐狸 🦊", "Steps: 4, Sampler: UniPC, CFG scale: 1, Seed: 0, Size: 24x16, Model: x"]
    parsed = parse_parameters(params)
    assert parsed["prompt"] == meta["prompt"] and "negative_prompt" not in parsed and parsed["scheduler"] == "unipc"
