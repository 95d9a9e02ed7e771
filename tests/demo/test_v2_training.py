"""Demo v2 pieces: caption-grammar targets, the resolution timestep shift, phases, autoencoder crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from litedge.demo import caption_pretraining as C
from litedge.demo import training as T
from litedge.demo.shapes import COLOURS, RELATIONS, SHAPES, eval_prompts
from litedge.distill import losses as L


def test_token_labels_name_each_words_object_and_the_relation():
    labels = C.token_labels("a purple square to the left of a cyan circle", 16)
    words = 10
    colour, shape = list(COLOURS), list(SHAPES)
    assert [colour[i] for i in labels["colour"][:3]] == ["purple"] * 3
    assert [shape[i] for i in labels["shape"][7:10]] == ["circle"] * 3
    assert (labels["slot"][:3] == 0).all() and (labels["slot"][7:10] == 1).all()
    assert (labels["colour"][3:7] == C.IGNORE).all()  # "to the left of" belongs to no object
    assert (labels["relation"][: words + 1] == 1 + RELATIONS.index("to the left of")).all()  # + </s>
    assert (labels["relation"][words + 1:] == C.IGNORE).all()  # padding
    counting = C.token_labels("three yellow triangles", 16)
    assert (counting["count"][:3] == 2).all() and (counting["shape"][:3] == SHAPES.index("triangle")).all()


def test_swapped_colours_give_swapped_targets():
    a = C.token_labels("a red circle and a blue square", 16)
    b = C.token_labels("a blue circle and a red square", 16)
    assert (a["colour"][:3] == b["colour"][4:7]).all() and (a["colour"][4:7] == b["colour"][:3]).all()
    assert (a["shape"] == b["shape"]).all()


def test_heads_learn_the_grammar_on_a_few_captions():
    """A tiny encoder fits held-in captions' labels (the objective is learnable and the loss falls)."""
    p = T.PRESETS["tiny"]
    captions = [s.caption for s in eval_prompts(20, 0)]
    tok = T.build_tokenizer(p.text_max_length)
    ids, mask = T.tokenize(tok, captions, p.text_max_length)
    labels = {k: torch.from_numpy(v) for k, v in C.label_arrays(captions, p.text_max_length).items()}
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"text_encoder": T.make_text_encoder(p), "heads": C.CaptionHeads(p.text_width)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = C.caption_loss(model, ids, mask, labels)["total"]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first
    assert C.evaluate(model, ids, mask, labels)["token_accuracy"]["colour"] > 0.9


def test_shifted_timesteps_divide_the_snr_by_shift_squared():
    schedule = L.DDPMSchedule.linear()
    acp = schedule.alphas_cumprod.double()
    t = torch.arange(0, 1000, 37)
    assert torch.equal(T.shifted_timesteps(t, 1.0), t)
    moved = T.shifted_timesteps(t, 4.0)
    assert (moved >= t).all() and (moved[(t > 0) & (t < 999)] > t[(t > 0) & (t < 999)]).all()  # more noise
    snr = lambda a: a / (1 - a)  # noqa: E731
    want = snr(acp[t]) / 16
    got = snr(acp[moved])
    inside = moved < 999  # the schedule's end clips the shift
    # discrete steps: the chosen step is the last whose SNR is still >= the target; the next one is below it
    assert (got[inside] >= want[inside] * 0.9999).all()
    assert (snr(acp[(moved + 1).clamp(max=999)])[inside] <= want[inside] * 1.0001).all()


def test_phases_split_the_steps_by_their_shares():
    p = T.PRESETS["full"]
    sizes = [T.phase_of(p, 1000, s)[0] for s in range(1000)]
    assert sizes[0] == 256 and sizes[-1] == 1024 and sizes == sorted(sizes)
    assert sizes.count(256) == 800 and sizes.count(512) == 130 and sizes.count(1024) == 70
    assert [T.resolution_shift(p, s) for s in (256, 512, 1024)] == [1.0, 2.0, 3.0]
    assert p.trained_sizes == [256, 512, 1024] and p.vae_factor == 32
    config = T.make_teacher(T.PRESETS["tiny"]).config
    assert config.sample_size * 32 == 128 and config.interpolation_scale == 2  # native 128 px, 64 px grid


def test_autoencoder_crops_show_objects_and_its_factor_is_32():
    from litedge.demo.autoencoder import crop_batch, make_autoencoder

    crops = crop_batch(np.random.default_rng(0), 16, 64)
    assert crops.shape == (16, 64, 64, 3) and crops.dtype == np.uint8
    assert sum((c > 0).any() for c in crops) >= 8  # most crops hold part of an object
    p = T.PRESETS["tiny"]
    ae = make_autoencoder(p.ae_latent_channels, p.ae_encoder_channels, p.ae_decoder_channels, p.ae_decoder_layers)
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 96, 64)).latent
        assert tuple(z.shape) == (1, p.ae_latent_channels, 3, 2)
        assert tuple(ae.decode(z).sample.shape) == (1, 3, 96, 64)


@pytest.mark.parametrize("size", [64, 128])
def test_teacher_loss_runs_at_every_phase_size(size):
    p = T.PRESETS["tiny"]
    transformer = T.make_teacher(p)
    b, n = 2, size // p.vae_factor
    text = torch.randn(b, p.text_max_length, p.text_width)
    mask = torch.ones(b, p.text_max_length, dtype=torch.int64)
    batch = {"latents": torch.randn(b, p.ae_latent_channels, n, n), "text": text, "mask": mask, "empty_mask": mask[:1]}
    terms = T.teacher_loss(transformer, batch, text[:1], T.step_generator(0, 0), p, size)
    assert torch.isfinite(terms["total"]) and terms["total"] > 0
