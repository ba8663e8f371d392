"""The demo CLIP: a few training steps write a config+weights pair that open_clip reloads."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from vl2v.demo import digits, teacher
from vl2v.demo.teacher_pool import KINDS, TeacherBatches, captions

TINY = teacher.TeacherRecipe(batch_size=16, n_synth=20, n_patches=10, steps=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return teacher.train_demo_teacher(out, seed=0, recipe=TINY)


def test_pair_reloads_with_open_clip_and_embeds(trained):
    config_json, weights_pt = trained
    assert json.loads(config_json.read_text()) == teacher.MODEL_CONFIG
    open_clip.add_model_config(config_json)
    model = open_clip.create_model(config_json.stem, pretrained=None)
    model.load_state_dict(torch.load(weights_pt, map_location="cpu", weights_only=True))
    model.eval()
    tokenizer = open_clip.get_tokenizer(config_json.stem)
    with torch.no_grad():
        image = model.encode_image(torch.randn(2, 3, 32, 32))
        text = model.encode_text(tokenizer(["a photo of a seven", "the number 3"]))
    width = teacher.MODEL_CONFIG["embed_dim"]
    for emb in (image, text):
        assert emb.shape == (2, width) and torch.isfinite(emb).all()
        norms = torch.nn.functional.normalize(emb, dim=-1).norm(dim=-1)
        assert torch.allclose(norms, torch.ones(2), atol=1e-5)


def test_training_changed_the_weights_and_wrote_provenance(trained):
    config_json, weights_pt = trained
    fresh, _, _ = teacher.create_demo_clip(config_json)
    state = torch.load(weights_pt, weights_only=True)
    assert not torch.equal(state["visual.conv1.weight"], fresh.state_dict()["visual.conv1.weight"])
    meta = json.loads(weights_pt.with_suffix(".meta.json").read_text())
    assert meta["steps"] == 3 and meta["params"]["seed"] == 0
    assert sorted(meta["validation"]) == list(digits.DOMAINS)
    assert all(0.0 <= v <= 1.0 for v in meta["validation"].values())


def test_a_frozen_token_table_stays_as_initialised(tmp_path):
    recipe = teacher.TeacherRecipe(batch_size=8, n_synth=10, n_patches=5, steps=2, train_token_embedding=False)
    config_json, weights_pt = teacher.train_demo_teacher(tmp_path, seed=0, recipe=recipe)
    torch.manual_seed(0)  # train_demo_teacher seeds the same way before building the model
    fresh, _, _ = teacher.create_demo_clip(config_json)
    state = torch.load(weights_pt, weights_only=True)
    assert torch.equal(state["token_embedding.weight"], fresh.state_dict()["token_embedding.weight"])
    assert not torch.equal(state["text_projection"], fresh.state_dict()["text_projection"])


def test_loss_is_clip_loss_without_class_targets_and_counts_same_class_pairs_with_them():
    g = torch.Generator().manual_seed(0)
    image_f = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    text_f = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    scale, labels = torch.tensor(5.0), torch.tensor([0, 1, 0, 2, 1, 0])
    clip = open_clip.ClipLoss()(image_f, text_f, scale)
    assert torch.allclose(teacher.contrastive_loss(image_f, text_f, scale, labels, 0.0), clip)
    logits = scale * image_f @ text_f.T
    same = (labels[:, None] == labels[None]).float()
    target = same / same.sum(1, keepdim=True)  # e.g. row 0: 1/3 on pairs 0, 2 and 5
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(teacher.contrastive_loss(image_f, text_f, scale, labels, 1.0), expected)


def test_same_parameters_skip_training(trained, monkeypatch):
    monkeypatch.setattr(teacher, "_train", lambda *a, **k: pytest.fail("retrained"))
    again = teacher.train_demo_teacher(trained[0].parent, seed=0, recipe=TINY)
    assert again == trained


def test_same_seed_same_weights(tmp_path):
    recipe = teacher.TeacherRecipe(batch_size=8, n_synth=10, n_patches=5, steps=2)
    a = teacher.train_demo_teacher(tmp_path / "a", seed=3, recipe=recipe)[1]
    b = teacher.train_demo_teacher(tmp_path / "b", seed=3, recipe=recipe)[1]
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batches_use_the_teachers_own_preprocessing(trained):
    model, preprocess, tokenizer = teacher.load_demo_teacher(*trained)
    pp = open_clip.get_model_preprocess_cfg(model)
    batches = TeacherBatches(tokenizer, pp["mean"], pp["std"], {"mnist": 1.0}, 10, 5, 0.0, 0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - batches.mean) / batches.std
    theirs = preprocess(Image.fromarray(img))
    assert torch.allclose(ours[0], theirs, atol=1e-5)
    images, tokens, labels = batches.sample(6)
    assert images.shape == (6, 3, 32, 32) and tokens.shape == (6, 16) and labels.shape == (6,)
    for row, label in zip(tokens, labels):  # each caption is one of its digit's captions
        assert (batches.tokens["mnist"][label] == row).all(1).any()


def test_captions_fit_the_context_and_name_the_class():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # same bundled BPE as the demo model
    for kind in KINDS:
        rows = captions(kind)
        assert len(rows) == 10
        for c, row in enumerate(rows):
            for text in row:
                assert len(tokenizer.encode(text)) + 2 <= 16, text
                assert str(c) in text or digits.sources.CLASS_WORDS[c] in text, text


def test_zero_shot_accuracy_reports_every_domain(trained, tmp_path):
    root = digits.build_digits_dg(tmp_path, per_class=1)
    acc = teacher.zero_shot_accuracy(*trained, root)
    assert sorted(acc) == list(digits.DOMAINS)
    assert all(0.0 <= v <= 1.0 for v in acc.values())
