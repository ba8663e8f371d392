"""The demo student's pretraining: a glyph task of its own, saved as weights timm loads itself."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from vl2v.demo import pretrain, sources

TINY = pretrain.PretrainRecipe(student="test_resnet", glyphs=20, patches=5, steps=2, batch_size=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return pretrain.pretrain_demo_student(tmp_path_factory.mktemp("student"), seed=0, recipe=TINY)


def test_glyphs_are_no_digit_nor_drawn_like_one():
    assert not set(pretrain.GLYPHS) & set("0123456789OoIl")
    assert len(set(pretrain.GLYPHS)) == len(pretrain.GLYPHS) == 57
    assert not set(pretrain.TEXTURES) & set(sources.DEMO_TEXTURES)


def test_views_are_images_in_range_with_their_glyph_labels():
    batches = pretrain.GlyphBatches(len(pretrain.GLYPHS), 4, seed=0)
    x, y = batches.sample(32)
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.1
    assert set(y.tolist()) <= set(range(len(pretrain.GLYPHS)))


def test_timm_loads_the_weights_strictly_with_the_overlay(weights):
    state = torch.load(weights, weights_only=True)
    assert not [k for k in state if k.startswith("fc.")]  # no classifier: a featurizer
    model = timm.create_model("test_resnet", pretrained=True, num_classes=0, **pretrain.student_kwargs(weights))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert sorted(model.state_dict()) == sorted(state)
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    first = next(iter(state))
    assert not torch.equal(fresh.state_dict()[first], state[first])



def test_the_overlay_loads_strictly(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state.pop(next(iter(state)))
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(RuntimeError, match="Missing key"):  # not silently left at random init
        timm.create_model("test_resnet", pretrained=True, num_classes=0, **pretrain.student_kwargs(partial))


def test_meta_records_the_recipe_and_same_parameters_skip(weights, monkeypatch):
    meta = json.loads(weights.with_suffix(".meta.json").read_text())
    assert meta["params"]["steps"] == 2 and meta["params"]["seed"] == 0
    assert 0.0 <= meta["val_acc"] <= 1.0
    monkeypatch.setattr(pretrain, "_train", lambda *a, **k: pytest.fail("pretrained again"))
    assert pretrain.pretrain_demo_student(weights.parent, seed=0, recipe=TINY) == weights


def test_same_seed_same_weights(tmp_path, weights):
    again = pretrain.pretrain_demo_student(tmp_path, seed=0, recipe=TINY)
    a, b = torch.load(weights, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vl2v_align_starts_from_the_weights_through_model_kwargs(weights, tmp_path):
    """The path `vl2v demo` takes, from the command line: `--pretrained --model-kwargs
    pretrained_cfg_overlay=JSON`. Align freezes the featurizer and its BatchNorm, so every tensor
    of the featurizer it saves is the pretrained one."""
    from conftest import make_cached_toy
    from typer.testing import CliRunner

    from vl2v.cli import app

    root, cache = make_cached_toy(tmp_path, per_class=4)
    overlay = json.dumps(pretrain.student_kwargs(weights)["pretrained_cfg_overlay"])
    result = CliRunner().invoke(app, [
        "align", str(root), "--cache-dir", str(cache), "--student", "test_resnet", "--pretrained",
        "--model-kwargs", f"pretrained_cfg_overlay={overlay}", "--image-size", "32", "--batch-size", "2",
        "--steps", "2", "--checkpoint-freq", "1", "--workers", "0", "--test-env", "art",
        "--run-dir", str(tmp_path / "run"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["model_kwargs"] == pretrain.student_kwargs(weights) and config["pretrained"]
    saved = torch.load(tmp_path / "run" / "env0" / "best.pt", weights_only=True)
    for key, value in torch.load(weights, weights_only=True).items():
        assert torch.equal(saved[f"featurizer.{key}"], value), key
