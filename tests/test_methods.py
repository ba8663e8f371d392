"""The method registry: each method's loss by hand, a new method through the same loop, ERM with no
teacher at all, KD, the white-box student, deployment runs, curves, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cached_toy, make_dataset, train_method

from vl2v import runs
from vl2v.config import TrainConfig
from vl2v.methods import METHODS, Method, StepTargets, expand_methods, get_method, register
from vl2v.runtime import UserError
from vl2v.student import LinearHead, TextHead, build_student

TINY = dict(student="test_vit", pretrained=False, image_size=32, batch_size=4, workers=0, device="cpu")
CFG = TrainConfig(**TINY)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    root, cache = make_cached_toy(tmp, per_class=4)
    return tmp, root, cache


def batch(seed: int = 0, b: int = 6, c: int = 3, d: int = 16, f: int = 8):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, f, generator=g)
    targets = StepTargets(torch.randint(c, (b,), generator=g), F.normalize(torch.randn(b, d, generator=g), dim=-1),
                          F.normalize(torch.randn(c, d, generator=g), dim=-1), 100.0)
    return features, targets


# --- losses by hand -------------------------------------------------------------------------------


def test_erm_is_cross_entropy_of_the_linear_head():
    features, t = batch()
    head = LinearHead(8, 3)
    logits = features @ head.classifier.weight.T + head.classifier.bias
    by_hand = -torch.log_softmax(logits, 1)[torch.arange(6), t.labels].mean()
    assert torch.allclose(get_method("erm").loss(head, features, t, CFG), by_hand, atol=1e-6)


def test_kd_is_cross_entropy_plus_tempered_kl_to_the_teachers_zero_shot():
    features, t = batch(1)
    head = LinearHead(8, 3)
    cfg = TrainConfig(**TINY, kd_temperature=2.0, kd_weight=0.25)
    logits = head(features)
    teacher = torch.softmax(100.0 * (t.image @ t.text.T) / 2.0, 1)
    student = torch.softmax(logits / 2.0, 1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    ce = -torch.log_softmax(logits, 1)[torch.arange(6), t.labels].mean()
    by_hand = 0.75 * ce + 0.25 * 4.0 * kl
    assert torch.allclose(get_method("kd").loss(head, features, t, cfg), by_hand, atol=1e-5)


def test_align_and_distill_use_the_cosine_loss_of_the_projected_features():
    features, t = batch(2)
    head = TextHead(8, t.text, 100.0)
    p = head.projection(features)
    by_hand = -(0.5 * F.cosine_similarity(p, t.image) + 0.5 * F.cosine_similarity(p, t.text[t.labels])).mean()
    for name in ("align", "distill"):
        assert torch.allclose(get_method(name).loss(head, features, t, CFG), by_hand, atol=1e-6)


def test_what_each_method_trains_and_needs():
    assert {n: (m.head, sorted(m.trains), m.needs_cache, m.starts_from) for n, m in METHODS.items()} == {
        "align": ("text", ["head"], True, None),
        "distill": ("text", ["featurizer"], True, "align"),
        "erm": ("linear", ["featurizer", "head"], False, None),
        "kd": ("linear", ["featurizer", "head"], True, None),
    }
    assert expand_methods(["adip", "erm", "kd"]) == ["align", "distill", "erm", "kd"]
    assert expand_methods(["distill", "align"]) == ["align", "distill"]  # a continuing method after its start


def test_unknown_method_suggests():
    with pytest.raises(UserError, match=r"Unknown method 'ermm'\. Did you mean 'erm'\?"):
        get_method("ermm")
    with pytest.raises(UserError, match=r"Unknown method 'adp'\. Did you mean 'adip'\?"):
        expand_methods(["adp"])


# --- the one loop ---------------------------------------------------------------------------------


def test_a_registered_toy_method_trains_through_the_same_loop(cached):
    tmp, root, cache = cached
    calls = []

    def toy_loss(head, features, t, cfg):
        calls.append(features.requires_grad)
        return head(features).float().logsumexp(1).mean()  # any differentiable function of the head

    register(Method("toy", "a test method", head="linear", trains=frozenset({"head"}), needs_cache=False, loss=toy_loss))
    try:
        run_dir, finals = train_method("toy", root, {**TINY, "steps": 3, "checkpoint_freq": 2, "test_envs": ("art",)}, tmp / "toy_run")
    finally:
        del METHODS["toy"]
    assert calls == [False, False, False]  # the frozen featurizer built no graph
    assert set(finals["art"]) == {"training-domain validation", "SWAD"}
    state = torch.load(run_dir / "env0" / "best.pt", weights_only=True)
    assert "head.classifier.weight" in state and runs.run_info(run_dir)["cache_dir"] is None


def test_erm_runs_without_any_cache_and_never_imports_open_clip(tmp_path):
    root = make_dataset(tmp_path / "toy", per_class=3)
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from vl2v.cli import app
        r = CliRunner().invoke(app, ["train", {str(root)!r}, "--method", "erm", "--student", "test_resnet", "--no-pretrained",
                                     "--batch-size", "2", "--steps", "2", "--checkpoint-freq", "1", "--workers", "0",
                                     "--test-env", "photo", "--run-dir", {str(tmp_path / 'erm')!r}, "--json"])
        assert r.exit_code == 0, r.output
        print(r.stdout)
        assert "open_clip" not in sys.modules, "ERM imported open_clip"
    """)
    env = {"VL2V_CACHE": str(tmp_path / "no_cache_here"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "photo" in json.loads(done.stdout)
    assert not (tmp_path / "no_cache_here").exists()


def test_kd_from_the_cache_and_a_cache_method_without_a_cache(cached, tmp_path):
    tmp, root, cache = cached
    run_dir, finals = train_method("kd", root, {**TINY, "steps": 2, "checkpoint_freq": 1, "test_envs": ("photo",)}, tmp_path / "kd", cache)
    assert set(finals["photo"]) == {"training-domain validation", "SWAD"}
    assert runs.run_info(run_dir)["cache_dir"] == str(cache.resolve())
    with pytest.raises(UserError, match=r"No teacher cache at .*Build it with: vl2v embed"):
        train_method("kd", root, {**TINY, "steps": 1}, tmp_path / "kd2", tmp_path / "missing_cache")
    assert not (tmp_path / "kd2").exists()


def test_distill_without_from(cached, tmp_path):
    tmp, root, cache = cached
    with pytest.raises(UserError, match="starts from a run of method 'align': pass --from RUN_DIR"):
        train_method("distill", root, TINY, tmp_path / "d", cache)


# --- deployment runs ------------------------------------------------------------------------------


def test_test_env_none_trains_one_model_on_every_domain(cached, tmp_path):
    from rich.console import Console

    from vl2v.results import collect
    from vl2v.tables import finals_table

    tmp, root, cache = cached
    align_dir, finals = train_method("align", root, {**TINY, "steps": 3, "checkpoint_freq": 2, "test_envs": ("none",)}, tmp_path / "runs" / "align", cache)
    assert list(finals) == ["none"] and finals["none"]["SWAD"]["test_in_acc"] is None
    assert (align_dir / "all" / "best.pt").exists() and (align_dir / "all" / "swad.pt").exists()
    assert not list(align_dir.glob("env*"))
    record = runs.read_records(align_dir / "all")[0]
    assert record["tr_outacc"] == pytest.approx((record["env0_out_acc"] + record["env1_out_acc"] + record["env2_out_acc"]) / 3)
    _, d_finals = train_method("distill", None, {**TINY, "steps": 2, "checkpoint_freq": 1}, tmp_path / "runs" / "distill", from_run=align_dir)
    assert list(d_finals) == ["none"]
    assert collect(tmp_path / "runs") == []  # no held-out domain: nothing to report as a test figure
    console = Console(width=200, record=True)
    console.print(finals_table(d_finals))
    assert f"validation {100 * d_finals['none']['SWAD']['tr_outacc']:.1f}" in console.export_text()  # not "- / -"


# --- the white-box student ------------------------------------------------------------------------


def test_teacher_student_starts_as_the_teachers_own_image_embedding(cached):
    from vl2v.teacher import create_teacher

    tmp, root, cache = cached
    spec = str(next(tmp.glob("tiny-clip.json"))) + ":" + str(next(tmp.glob("tiny-clip.pt")))
    teacher = create_teacher(spec, torch.device("cpu"))
    text = F.normalize(torch.randn(3, 16), dim=-1)
    model, data_cfg = build_student(TrainConfig(student="teacher"), "text", 3, text, 100.0, spec, pretrained=True)
    assert data_cfg.image_size == 32 and model.featurizer.num_features == 32  # the ViT's width: its proj is the head's now
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode(x), teacher.encode_images(x), atol=1e-5)
    with pytest.raises(UserError, match="--student teacher needs the teacher's weights"):
        build_student(TrainConfig(student="teacher"), "text", 3, text, 100.0, str(next(tmp.glob("tiny-clip.json"))), pretrained=True)


def test_teacher_student_trains_from_the_cache(cached, tmp_path):
    tmp, root, cache = cached
    flags = {k: v for k, v in TINY.items() if k not in ("student", "image_size")}
    run_dir, finals = train_method("align", root, {**flags, "student": "teacher", "steps": 2, "checkpoint_freq": 1, "test_envs": ("art",)}, tmp_path / "wb", cache)
    assert set(finals["art"]) == {"training-domain validation", "SWAD"}


# --- training curves ------------------------------------------------------------------------------


def test_log_tensorboard_writes_loss_and_validation_scalars(cached, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, root, cache = cached
    run_dir, _ = train_method("align", root, {**TINY, "steps": 3, "checkpoint_freq": 2, "test_envs": ("art",), "log": "tensorboard"}, tmp_path / "tb", cache)
    events = EventAccumulator(str(run_dir / "env0" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "tr_outacc", "tr_outloss", "env1_out_acc"} <= set(tags)
    assert [e.step for e in events.Scalars("tr_outacc")] == [0, 2]
    records = [r for r in runs.read_records(run_dir / "env0") if r["kind"] == "checkpoint"]
    assert [e.value for e in events.Scalars("tr_outloss")] == pytest.approx([r["tr_outloss"] for r in records], rel=1e-6)
    assert len(events.Scalars("loss")) == 3 + 2  # every step, and the checkpoints' mean loss
