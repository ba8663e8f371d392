"""The student: the text-embedding head by hand, what each stage freezes, timm names and aliases."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

from vl2v.config import TrainConfig
from vl2v.losses import adip_loss
from vl2v.runtime import UserError
from vl2v.methods import get_method
from vl2v.student import ALIASES, LinearHead, Student, TextHead, create_featurizer, create_student, resolve_student_name
from vl2v.train import build_model, set_train_mode

TINY = dict(student="test_vit", pretrained=False, image_size=32)


def class_embeddings(n: int = 3, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- the head -------------------------------------------------------------------------------------


def test_forward_is_normalised_projection_against_scaled_text():
    torch.manual_seed(0)
    text = class_embeddings()
    model, data_cfg = create_student("test_vit", "text", 3, text, 100.0, pretrained=False, image_size=32)
    assert data_cfg.image_size == 32
    assert model.head.projection.in_features == model.featurizer.num_features
    assert model.head.projection.out_features == 16
    assert torch.equal(model.head.classifier, text * 100.0)
    assert not any(n == "head.classifier" for n, _ in model.named_parameters())  # a buffer, never trained
    assert "head.classifier" in model.state_dict()

    model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        f = model.featurizer(x)
        p = f @ model.head.projection.weight.T + model.head.projection.bias
        by_hand = (p / p.norm(dim=1, keepdim=True)) @ (text * 100.0).T
        logits = model(x)
        embedded = model.encode(x)
    assert logits.shape == (5, 3)
    assert torch.allclose(embedded, p / p.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(logits, by_hand, atol=1e-4)
    # logits are cosines × 100: bounded by the logit scale, and the argmax is the nearest class
    assert logits.abs().max() <= 100.0 + 1e-4
    cos = F.cosine_similarity(p[:, None, :], text[None, :, :], dim=-1)
    assert torch.equal(logits.argmax(1), cos.argmax(1))


def test_classifier_buffer_is_class_embeddings_times_logit_scale():
    text = class_embeddings(4, 8, seed=3)
    featurizer, _ = create_featurizer("test_vit", pretrained=False, image_size=32)
    head = TextHead(featurizer.num_features, text.double(), 42.5)
    assert head.classifier.dtype == torch.float32
    assert torch.allclose(head.classifier, text * 42.5)
    text.zero_()  # the buffer is the student's own copy
    assert head.classifier.abs().sum() > 0


def test_linear_head_is_a_trained_classifier_on_the_features():
    torch.manual_seed(0)
    model, _ = create_student("test_vit", "linear", 5, pretrained=False, image_size=32)
    assert isinstance(model.head, LinearHead) and model.head.classifier.out_features == 5
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        f = model.featurizer(x)
        assert torch.allclose(model(x), f @ model.head.classifier.weight.T + model.head.classifier.bias, atol=1e-5)
        assert torch.allclose(model.encode(x), F.normalize(f, dim=-1), atol=1e-6)


# --- what each stage trains -----------------------------------------------------------------------


def context(method: str, from_run: Path | None = None, **kw):
    """What build_model reads of a training context."""
    cfg = TrainConfig(method=method, **{**TINY, **kw})
    targets = SimpleNamespace(text=class_embeddings(), logit_scale=100.0)
    index = SimpleNamespace(classes=["a", "b", "c"])
    return SimpleNamespace(cfg=cfg, method=get_method(method), targets=targets, index=index, from_run=from_run,
                           teacher=None, device=torch.device("cpu"), data_cfg=None)


def one_step_grads(model: Student, method: str, freeze_bn: bool = True) -> tuple[dict, dict, torch.Tensor]:
    """One training forward/backward as train_env does it; returns grads and the featurizer output."""
    set_train_mode(model, freeze_bn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    image_t, text_t = F.normalize(torch.randn(4, 16, generator=g), dim=-1), F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    with torch.set_grad_enabled(get_method(method).trains_featurizer):
        features = model.featurizer(x)
    loss = adip_loss(model.head.embed(features), image_t, text_t)
    loss.backward()
    feat = {n: p.grad for n, p in model.featurizer.named_parameters()}
    proj = {n: p.grad for n, p in model.head.projection.named_parameters()}
    return feat, proj, features


def test_align_trains_only_the_projection_and_builds_no_featurizer_graph():
    model = build_model(context("align"), 0)
    assert not any(p.requires_grad for p in model.featurizer.parameters())
    assert all(p.requires_grad for p in model.head.projection.parameters())
    feat, proj, features = one_step_grads(model, "align")
    assert len(proj) == 2 and all(g is not None and g.abs().sum() > 0 for g in proj.values())
    assert len(feat) > 10 and all(g is None for g in feat.values()), [n for n, g in feat.items() if g is not None]
    assert features.requires_grad is False and features.grad_fn is None


def test_distill_trains_only_the_featurizer_from_the_align_model(tmp_path):
    align = build_model(context("align"), 0)
    with torch.no_grad():
        align.head.projection.weight.mul_(3.0)  # a recognisable Align model
    (tmp_path / "env1").mkdir()
    torch.save(align.state_dict(), tmp_path / "env1" / "best.pt")

    model = build_model(context("distill", from_run=tmp_path), 1)
    for key, value in align.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.requires_grad for p in model.featurizer.parameters())
    assert not any(p.requires_grad for p in model.head.projection.parameters())
    feat, proj, features = one_step_grads(model, "distill")
    assert all(g is None for g in proj.values())
    missing = [n for n, g in feat.items() if g is None]
    assert not missing and len(feat) > 10
    assert features.grad_fn is not None


def test_distill_of_a_batchnorm_student_grads_every_featurizer_parameter(tmp_path):
    kw = dict(student="test_resnet", image_size=None, model_kwargs={"zero_init_last": False})
    align = build_model(context("align", **kw), 0)
    (tmp_path / "env0").mkdir()
    torch.save(align.state_dict(), tmp_path / "env0" / "best.pt")
    model = build_model(context("distill", from_run=tmp_path, **kw), 0)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    feat, proj, _ = one_step_grads(model, "distill", freeze_bn=True)
    assert all(not m.training for m in bn) and model.featurizer.training
    assert all(g is not None for g in feat.values()) and all(g is None for g in proj.values())
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in bn)  # affine still trains
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k  # eval-mode BatchNorm: stats untouched

    set_train_mode(model, freeze_bn=False)
    assert all(m.training for m in bn)


# --- names ----------------------------------------------------------------------------------------


def test_aliases_resolve_to_the_papers_exact_weights():
    assert {k: resolve_student_name(k) for k in ALIASES} == {
        "rn50": "resnet50.tv_in1k",
        "vitb": "vit_base_patch16_224.augreg_in21k_ft_in1k",
        "vits": "vit_small_patch16_224.augreg_in21k_ft_in1k",
        "deits": "deit_small_distilled_patch16_224.fb_in1k",
    }
    # the tags exist, and the DeiT tag is the only (so the original's) one
    pretrained = set(timm.list_pretrained())
    assert all(resolve_student_name(k) in pretrained for k in ALIASES)
    assert timm.list_pretrained("deit_small_distilled_patch16_224*") == ["deit_small_distilled_patch16_224.fb_in1k"]
    assert resolve_student_name("test_vit") == "test_vit"  # plain timm names pass through


@pytest.mark.parametrize("name, meant", [("vit_smal_patch16_224", "vit_small_patch16_224"), ("resnet5O", "resnet50"), ("test_vitt", "test_vit")])
def test_unknown_timm_name_suggests(name, meant):
    with pytest.raises(UserError, match="Did you mean") as e:
        resolve_student_name(name)
    assert f"Unknown student '{name}'" in str(e.value)
    assert f"'{meant}'" in str(e.value)
    with pytest.raises(UserError, match="Did you mean"):
        create_student(name, "text", 3, class_embeddings(), 100.0, pretrained=False)


def test_bad_model_kwargs_is_a_user_error():
    with pytest.raises(UserError, match="Cannot build student test_vit"):
        create_featurizer("test_vit", pretrained=False, image_size=32, no_such_argument=3)


def test_distilled_deit_feature_is_the_mean_of_class_and_distillation_tokens():
    model, _ = create_featurizer("deit_tiny_distilled_patch16_224", pretrained=False, image_size=32, depth=1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = model(x)
    assert torch.allclose(out, (tokens[:, 0] + tokens[:, 1]) / 2, atol=1e-6)
