"""Data layouts, the feature cache and the (seed, step) -> batch order."""

import json

import pytest
import torch

from litedge.distill.data import FeatureCache, cache_features, discover, step_indices
from litedge.errors import LitedgeError
from tests.distill.fixtures import make_shapes_dataset, tiny_vae


def test_caption_folder_jsonl_and_class_folders(tmp_path):
    folder = make_shapes_dataset(tmp_path / "caps", count=4)
    samples = discover(folder)
    assert [s.caption for s in samples] == ["a red square", "a green square", "a blue square", "a yellow square"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"caps/{s.path.name}", "caption": s.caption}) for s in samples))
    assert [s.path for s in discover(jsonl)] == [s.path for s in samples]
    classes = discover(make_shapes_dataset(tmp_path / "cls", count=8, classes=True))
    assert sorted({s.label for s in classes}) == list(range(8)) and all(s.caption is None for s in classes)


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"path": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(LitedgeError, match=r"d.jsonl:2: expected a JSON object"):
        discover(tmp_path / "d.jsonl")


def test_class_cache_has_scaled_latents_and_labels(tmp_path):
    data = make_shapes_dataset(tmp_path / "cls", count=6, classes=True)
    vae = tiny_vae()
    info = cache_features(data, vae, None, None, tmp_path / "cache", 64, shard_size=4, batch_size=4)
    assert info.count == 6 and info.keys == ["class_labels", "latents"]
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2
    cache = FeatureCache(tmp_path / "cache")
    batch = cache.batch([5, 0])
    assert batch["latents"].shape == (2, 4, 8, 8) and batch["class_labels"].tolist() == [5, 0]
    from litedge.distill.data import load_image
    with torch.no_grad():
        expected = vae.encode(load_image(discover(data)[0].path, 64)[None]).latent_dist.mean * 0.13025
    torch.testing.assert_close(batch["latents"][1:], expected)


def test_step_order_is_a_function_of_seed_and_step_and_shards_by_rank():
    a = [step_indices(10, 3, s, seed=1) for s in range(6)]
    assert a == [step_indices(10, 3, s, seed=1) for s in range(6)]
    assert sorted(sum(a[:3], [])) == sorted(set(sum(a[:3], [])))  # one epoch: no repeats
    assert a != [step_indices(10, 3, s, seed=2) for s in range(6)]
    r0, r1 = step_indices(10, 2, 0, seed=1, rank=0, world=2), step_indices(10, 2, 0, seed=1, rank=1, world=2)
    assert not set(r0) & set(r1)
    with pytest.raises(LitedgeError, match="--batch 8 is larger"):
        step_indices(10, 8, 0, seed=0, world=2)
