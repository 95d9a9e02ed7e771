"""Original-repo checkpoints: safe reading, layout detection, key mapping, inferred configs.

Round trips run diffusers -> original -> .pth -> read -> diffusers and demand bit-identical
outputs; a functional re-implementation of the original PixArt / DiT forward checks the
mapping itself (fused-projection split order, adaLN chunk orders) against diffusers.
"""

import argparse
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from safetensors.torch import save_file

from litedge.errors import LitedgeError
from litedge.models.linearize import linearize
from litedge.models.original_checkpoints import (
    detect_family,
    detect_layout,
    diffusers_dit_to_original,
    diffusers_pixart_to_original,
    infer_config,
    original_dit_to_diffusers,
    original_pixart_to_diffusers,
    read_checkpoint,
    convert_to_diffusers,
)
from litedge.models.student import build_from_config

HEADS = 2


def randomize(model, seed=0):
    """Perturb every parameter (zero-initialized ones included) so a skipped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tie_dit_embedders(model):
    """diffusers' DiT has one timestep/class embedder per block; the original shares one."""
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    return model


def tiny_pixart(micro=False):
    torch.manual_seed(0)
    return randomize(PixArtTransformer2DModel(
        num_layers=2, num_attention_heads=HEADS, attention_head_dim=24, in_channels=4, out_channels=8,
        caption_channels=20, cross_attention_dim=48, sample_size=8, norm_type="ada_norm_single",
        use_additional_conditions=micro))


def tiny_dit():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_layers=2, num_attention_heads=HEADS, attention_head_dim=16, in_channels=4,
                                  out_channels=8, sample_size=8, num_embeds_ada_norm=10, norm_eps=1e-6)
    return tie_dit_embedders(randomize(model))


def inputs(model, micro=False):
    g = torch.Generator().manual_seed(1)
    kw = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 700])}
    if isinstance(model, DiTTransformer2DModel):
        return {**kw, "class_labels": torch.tensor([3, 7])}
    cond = {"resolution": None, "aspect_ratio": None}
    if micro:
        cond = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    captions = torch.randn(2, 5, model.config.caption_channels, generator=g)
    return {**kw, "encoder_hidden_states": captions, "added_cond_kwargs": cond}


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def extras_of(model, kind):
    extras = {"pos_embed": model.pos_embed.pos_embed.clone()}  # (1, N, C) buffer, not in diffusers' state_dict
    if kind == "pixart":
        extras["null_caption_embedding"] = torch.randn(7, model.config.caption_channels)  # (L, caption_channels)
    return extras


TO_ORIGINAL = {"pixart": diffusers_pixart_to_original, "dit": diffusers_dit_to_original}
TO_DIFFUSERS = {"pixart": original_pixart_to_diffusers, "dit": original_dit_to_diffusers}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind,micro", [("pixart", False), ("pixart", True), ("dit", False)])
def test_pth_round_trip_is_bit_identical(kind, micro, tmp_path):
    model = tiny_pixart(micro) if kind == "pixart" else tiny_dit()
    extras = extras_of(model, kind)
    original = TO_ORIGINAL[kind](model.state_dict(), extras=extras)
    assert not any(k.startswith("transformer_blocks.") for k in original)
    torch.save({"state_dict": original, "epoch": 3}, tmp_path / "model.pth")

    sd = read_checkpoint(tmp_path / "model.pth")
    assert detect_layout(sd) == f"original-{kind}" and detect_family(sd) == "softmax"
    converted = TO_DIFFUSERS[kind](sd)
    assert converted.dropped == [] and converted.layout == f"original-{kind}"
    assert set(converted.extras) == set(extras)
    assert all(torch.equal(converted.extras[k], v) for k, v in extras.items())

    config = infer_config(sd, num_attention_heads=HEADS)
    assert {k: v for k, v in config.items() if not k.startswith("_")}.items() <= dict(model.config).items()
    again = infer_config(converted.state_dict, converted.layout, extras=converted.extras, num_attention_heads=HEADS)
    assert again == config
    assert converted.linear is None
    fresh = type(model).from_config(config)
    fresh.load_state_dict(converted.state_dict, strict=True)
    kw = inputs(model, micro)
    assert torch.equal(run(fresh.eval(), kw), run(model, kw))


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_round_trips_keep_every_key_and_value(kind):
    model = tiny_pixart(micro=True) if kind == "pixart" else tiny_dit()
    sd, extras = model.state_dict(), extras_of(model, kind)
    original = TO_ORIGINAL[kind](sd, extras=extras)
    back = TO_DIFFUSERS[kind](original)
    assert list(back.state_dict) and set(back.state_dict) == set(sd)
    assert all(torch.equal(back.state_dict[k], v) for k, v in sd.items())
    again = TO_ORIGINAL[kind](back.state_dict, extras=back.extras)
    assert set(again) == set(original)
    assert all(torch.equal(again[k], v) for k, v in original.items())


def test_pixart_original_names():
    model = tiny_pixart(micro=True)
    original = diffusers_pixart_to_original(model.state_dict(), extras=extras_of(model, "pixart"))
    assert {"pos_embed", "y_embedder.y_embedding", "x_embedder.proj.bias", "t_embedder.mlp.2.weight"} <= set(original)
    for name, shape in {"blocks.1.attn.qkv.weight": (144, 48), "blocks.0.cross_attn.kv_linear.bias": (96,),
                        "t_block.1.weight": (288, 48), "y_embedder.y_proj.fc1.weight": (48, 20),
                        "final_layer.scale_shift_table": (2, 48), "csize_embedder.mlp.0.weight": (16, 256),
                        "ar_embedder.mlp.2.bias": (16,), "blocks.0.mlp.fc2.weight": (48, 192)}.items():
        assert tuple(original[name].shape) == shape, name


def test_dit_original_names():
    original = diffusers_dit_to_original(tiny_dit().state_dict())
    for name, shape in {"blocks.1.attn.qkv.weight": (96, 32), "blocks.0.adaLN_modulation.1.weight": (192, 32),
                        "y_embedder.embedding_table.weight": (11, 32), "t_embedder.mlp.0.weight": (32, 256),
                        "final_layer.adaLN_modulation.1.bias": (64,), "final_layer.linear.weight": (32, 32),
                        "blocks.1.mlp.fc1.weight": (128, 32), "x_embedder.proj.weight": (32, 4, 2, 2)}.items():
        assert tuple(original[name].shape) == shape, name
    assert not any(".emb." in k or "norm1" in k for k in original)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_lit_checkpoint_round_trip(kind, tmp_path):
    teacher = tiny_pixart() if kind == "pixart" else tiny_dit()
    student = randomize(linearize(teacher, "lit", heads=2, kernel_size=3, seed=0)[0], seed=2)
    if kind == "dit":
        tie_dit_embedders(student)
    original = TO_ORIGINAL[kind](student.state_dict(), extras=extras_of(teacher, kind))
    assert {"blocks.0.attn.q.weight", "blocks.0.attn.kv.bias", "blocks.1.attn.dwc.weight",
            "blocks.1.attn.proj.weight"} <= set(original)
    torch.save(original, tmp_path / "lit.pth")
    sd = read_checkpoint(tmp_path / "lit.pth")
    assert detect_layout(sd) == f"original-{kind}" and detect_family(sd) == "lit"
    converted = convert_to_diffusers(sd)
    assert converted.family == "lit" and detect_layout(converted.state_dict) == "litedge-student"
    assert converted.linear == {"family": "lit", "heads": 2, "kernel_size": 3}

    config = infer_config(sd, num_attention_heads=HEADS)
    assert config["_litedge"] == converted.linear
    assert infer_config(converted.state_dict, extras=converted.extras, num_attention_heads=HEADS) == config
    fresh = build_from_config(config).eval()
    fresh.load_state_dict(converted.state_dict, strict=True)
    kw = inputs(teacher)
    assert torch.equal(run(fresh, kw), run(student.eval(), kw))


# ----------------------------------------------------------------------------- against the original forward


def sinusoid(t, shift):
    """Timestep features (B, 256): cos then sin; diffusers' DiT divides by (128 - 1), PixArt by 128."""
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / (128 - shift))
    args = t[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def attention(q, k, v, heads):
    """(B, N, C), (B, L, C), (B, L, C) -> (B, N, C)."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # (B, h, N, d)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape)


def self_attention(sd, p, x):
    q, k, v = lin(sd, f"{p}.attn.qkv", x).chunk(3, dim=-1)  # (B, N, C) each: qkv fused in that order
    return lin(sd, f"{p}.attn.proj", attention(q, k, v, HEADS))


def mlp(sd, p, x):
    return lin(sd, f"{p}.mlp.fc2", F.gelu(lin(sd, f"{p}.mlp.fc1", x), approximate="tanh"))


def norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def patchify_in(sd, x, pos):
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=2)  # (B, C, H/2, W/2)
    return x.flatten(2).transpose(1, 2) + pos  # (B, N, C)


def unpatchify(x, channels, grid=4, p=2):
    x = x.reshape(-1, grid, grid, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, channels, grid * p, grid * p)


def original_pixart_forward(sd, x, t, y, pos):
    """PixArt's forward as written in the original repo, on original names."""
    x = patchify_in(sd, x, pos)
    temb = lin(sd, "t_embedder.mlp.2", F.silu(lin(sd, "t_embedder.mlp.0", sinusoid(t, 0))))
    t0 = lin(sd, "t_block.1", F.silu(temb))  # (B, 6C)
    y = mlp({k.replace("y_embedder.y_proj", "y.mlp"): v for k, v in sd.items()}, "y", y)
    for i in range(2):
        p = f"blocks.{i}"
        sm, cm, gm, sf, cf, gf = (sd[f"{p}.scale_shift_table"][None] + t0.reshape(len(x), 6, -1)).chunk(6, dim=1)
        x = x + gm * self_attention(sd, p, norm(x) * (1 + cm) + sm)
        k, v = lin(sd, f"{p}.cross_attn.kv_linear", y).chunk(2, dim=-1)  # kv fused as (k, v)
        x = x + lin(sd, f"{p}.cross_attn.proj", attention(lin(sd, f"{p}.cross_attn.q_linear", x), k, v, HEADS))
        x = x + gf * mlp(sd, p, norm(x) * (1 + cf) + sf)
    shift, scale = (sd["final_layer.scale_shift_table"][None] + temb[:, None]).chunk(2, dim=1)
    return unpatchify(lin(sd, "final_layer.linear", norm(x) * (1 + scale) + shift), 8)


def original_dit_forward(sd, x, t, labels, pos):
    """DiT's forward as written in facebookresearch/DiT, on original names."""
    x = patchify_in(sd, x, pos)
    c = lin(sd, "t_embedder.mlp.2", F.silu(lin(sd, "t_embedder.mlp.0", sinusoid(t, 1))))
    c = F.silu(c + sd["y_embedder.embedding_table.weight"][labels])
    modulate = lambda h, shift, scale: norm(h) * (1 + scale[:, None]) + shift[:, None]
    for i in range(2):
        p = f"blocks.{i}"
        sm, cm, gm, sf, cf, gf = lin(sd, f"{p}.adaLN_modulation.1", c).chunk(6, dim=1)
        x = x + gm[:, None] * self_attention(sd, p, modulate(x, sm, cm))
        x = x + gf[:, None] * mlp(sd, p, modulate(x, sf, cf))
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", c).chunk(2, dim=1)
    return unpatchify(lin(sd, "final_layer.linear", modulate(x, shift, scale)), 8)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_mapping_matches_the_original_forward(kind):
    model = tiny_pixart() if kind == "pixart" else tiny_dit()
    original = TO_ORIGINAL[kind](model.state_dict())
    kw, pos = inputs(model), model.pos_embed.pos_embed
    forward, cond = {"pixart": (original_pixart_forward, "encoder_hidden_states"),
                     "dit": (original_dit_forward, "class_labels")}[kind]
    with torch.no_grad():
        ref = forward(original, kw["hidden_states"], kw["timestep"], kw[cond], pos)
    out = run(model, kw)
    assert out.abs().max() > 0.1  # a meaningful output, not a zero-initialized one
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_untied_dit_embedders_are_refused():
    model = randomize(DiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                            sample_size=8, num_embeds_ada_norm=10))
    with pytest.raises(LitedgeError, match="shares one embedder"):
        diffusers_dit_to_original(model.state_dict())


# ----------------------------------------------------------------------------- layouts and configs


def test_detect_layout_of_diffusers_models():
    assert detect_layout(tiny_pixart().state_dict()) == "diffusers-pixart"
    assert detect_layout(tiny_dit().state_dict()) == "diffusers-dit"
    sd3 = {"context_embedder.weight": torch.zeros(1), "transformer_blocks.0.attn.to_q.weight": torch.zeros(1)}
    assert detect_layout(sd3) == "diffusers-sd3"
    with pytest.raises(LitedgeError, match="unrecognised checkpoint layout"):
        detect_layout({"encoder.conv_in.weight": torch.zeros(1)})


def test_infer_config_defaults_for_pixart_sigma_xl():
    """Shapes only (meta tensors): PixArt-Sigma-XL-2-1024-MS reads as diffusers' config."""
    meta = lambda *shape: torch.empty(shape, device="meta")
    sd = {"x_embedder.proj.weight": meta(1152, 4, 2, 2), "final_layer.linear.weight": meta(32, 1152),
          "y_embedder.y_proj.fc1.weight": meta(1152, 4096), "t_block.1.weight": meta(6912, 1152),
          "pos_embed": meta(1, 4096, 1152), **{f"blocks.{i}.scale_shift_table": meta(6, 1152) for i in range(28)}}
    config = infer_config(sd)
    assert config == {**config, "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28,
                      "sample_size": 128, "out_channels": 8, "caption_channels": 4096, "cross_attention_dim": 1152,
                      "use_additional_conditions": False, "_class_name": "PixArtTransformer2DModel"}
    with pytest.raises(LitedgeError, match="pass sample_size"):
        infer_config({k: v for k, v in sd.items() if k != "pos_embed"})


def test_unknown_keys_raise_unless_not_strict():
    original = diffusers_pixart_to_original(tiny_pixart().state_dict())
    original["blocks.0.attn.sr.weight"] = torch.zeros(32, 32, 2, 2)  # PixArt-Sigma KV compression
    with pytest.raises(LitedgeError, match="KV compression"):
        original_pixart_to_diffusers(original)
    assert original_pixart_to_diffusers(original, strict=False).dropped == ["blocks.0.attn.sr.weight"]


# ----------------------------------------------------------------------------- safe reading


def _make_marker(path):
    Path(path).write_text("executed")
    return {}


class Payload:
    """A pickled object whose unpickling runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, path)
    with pytest.raises(LitedgeError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "refused" in message and "safetensors" in message and "_make_marker" in message
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()


def test_argparse_namespace_of_dit_training_checkpoints_is_allowed(tmp_path):
    ema, model = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    checkpoint = {"model": model, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(checkpoint, tmp_path / "c.pt")
    assert torch.equal(read_checkpoint(tmp_path / "c.pt")["w"], model["w"])
    assert torch.equal(read_checkpoint(tmp_path / "c.pt", prefer_ema=True)["w"], ema["w"])


def test_nesting_and_prefixes(tmp_path):
    ema = {"module.blocks.0._orig_mod.w": torch.ones(2), "module.step": 5}
    torch.save({"state_dict": {"module.w": torch.zeros(2)}, "state_dict_ema": ema}, tmp_path / "c.pth")
    assert set(read_checkpoint(tmp_path / "c.pth")) == {"w"}
    assert set(read_checkpoint(tmp_path / "c.pth", prefer_ema=True)) == {"blocks.0.w"}
    torch.save({"model": {"_orig_mod.module.x": torch.zeros(1)}, "epoch": 1}, tmp_path / "m.pth")
    assert set(read_checkpoint(tmp_path / "m.pth")) == {"x"}
    with pytest.raises(LitedgeError, match="no EMA weights"):
        read_checkpoint(tmp_path / "m.pth", prefer_ema=True)


def test_safetensors_is_read(tmp_path):
    save_file({"a": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


@pytest.mark.parametrize("case", ["missing", "truncated-pth", "truncated-safetensors", "garbage", "empty",
                                  "list", "no-tensors", "suffix"])
def test_bad_files_give_one_line_errors(case, tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    save_file({"w": torch.zeros(1000)}, tmp_path / "ok.safetensors")
    good_pth, good_st = (tmp_path / "ok.pth").read_bytes(), (tmp_path / "ok.safetensors").read_bytes()
    files = {"missing": None, "truncated-pth": ("x.pth", good_pth[: len(good_pth) // 2]),
             "truncated-safetensors": ("x.safetensors", good_st[: len(good_st) // 2]),
             "garbage": ("x.pt", b"not a checkpoint at all"), "empty": ("x.bin", b""), "suffix": ("x.onnx", good_pth)}
    path = tmp_path / "x.pth"
    if case == "list":
        torch.save([torch.zeros(1)], path)
    elif case == "no-tensors":
        torch.save({"epoch": 3}, path)
    elif files[case]:
        path = tmp_path / files[case][0]
        path.write_bytes(files[case][1])
    with pytest.raises(LitedgeError) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
