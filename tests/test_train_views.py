"""Training from cached views: the student sees the view the teacher embedded; `--views off` and
version-2 caches train as before; fast Align equals per-step Align; when fast Align does not apply."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from conftest import make_dataset, train_method, write_tiny_teacher
from test_cli_train import TINY as CLI_TINY
from test_cli_train import invoke, ok_json
from test_train import STRIP, TINY, context, weights_equal
from vl2v import runs
from vl2v.batches import StepBatches
from vl2v.cache import load_dataset_targets
from vl2v.config import TrainConfig
from vl2v.data import load_rgb, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.features import build_features
from vl2v.runtime import load_checkpoint
from vl2v.student import DataConfig
from vl2v.teacher import Teacher, create_teacher, normalization
from vl2v.runtime import UserError
from vl2v.train import batch_targets, prepare_data, segment_average, step_batches
from vl2v.viewcache import list_view_shards
from vl2v.views import ViewParams, render_view

VIEWS = 3
FLAGS = {**TINY, "steps": 7, "checkpoint_freq": 2, "lr": 3e-3, "test_envs": ("art", "photo")}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A toy dataset (3 domains × 3 classes × 6 images), its tiny-teacher cache with 3 views per
    image, and every batch of inputs the teacher embedded for it."""
    tmp = tmp_path_factory.mktemp("views")
    root = make_dataset(tmp / "toy", per_class=6)
    teacher = write_tiny_teacher(tmp)
    seen = []
    encode = Teacher.encode_images
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Teacher, "encode_images", lambda self, images: (seen.append(images.clone()), encode(self, images))[1])
        embed_dataset(scan_dataset(root), tmp / "cache", EmbedConfig(teacher=teacher, workers=0, device="cpu", batch_size=32, views=VIEWS))
    return tmp, root, tmp / "cache", teacher, torch.cat(seen[2:])  # 54 images in 2 batches, then the views in row order


def records(env_path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in STRIP} for r in runs.read_records(env_path)]


def assert_records_close(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r.keys() for r in a] == [r.keys() for r in b] and a
    for x, y in zip(a, b):
        for k, v in x.items():
            assert v == pytest.approx(y[k], abs=tol) if isinstance(v, float) else v == y[k], (x.get("step"), k)


def as_version_2(cache: Path, to: Path) -> Path:
    """The cache as vl2v wrote it before views: no view shards, a version-2 manifest."""
    shutil.copytree(cache, to, ignore=shutil.ignore_patterns("views-*"))
    manifest = json.loads((to / "manifest.json").read_text())
    del manifest["views"]
    manifest["format_version"] = 2
    manifest["cost"].pop("view_queries")
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


# --- what the student sees and what it is pulled toward -------------------------------------------


def test_each_sampled_image_takes_a_view_pure_in_seed_env_step_position(cached):
    tmp, root, cache, teacher, _ = cached
    ctx = context((tmp, root, cache), steps=8)
    ctx.targets = load_dataset_targets(root, cache, views=True)[1]
    batches = step_batches(ctx, 1, 0)
    plain = StepBatches(batches.root, batches.paths, batches.domain_rows, 4, batches.transform, batches.seed, 0, 8)
    ks = []
    for step in range(8):
        rows, seeds, k = batches.rows(step)
        assert np.array_equal((rows, seeds), plain.rows(step)[:2])  # the same rows and seeds as without views
        assert np.array_equal(k, batches.rows(step)[2]) and k.min() >= 0 and k.max() < VIEWS
        ks.append(k)
        halves = [StepBatches(batches.root, batches.paths, batches.domain_rows, 4, None, batches.seed, 0, 8, (rank, 2), batches.views).rows(step) for rank in (0, 1)]
        for whole, a, b in zip((rows, seeds, k), *halves):  # DDP: two processes' slices make the batch
            assert np.array_equal(whole, np.concatenate([a, b]))
    assert len({tuple(k) for k in ks}) > 1 and set(np.concatenate(ks)) == set(range(VIEWS))
    other = step_batches(ctx, 2, 0)
    assert any(not np.array_equal(other.rows(s)[2], ks[s]) for s in range(8))  # another held-out domain, other draws


def test_the_student_sees_the_view_the_teacher_embedded_pixel_for_pixel(cached):
    """With the teacher's size and normalisation, the training batch holds exactly the teacher's inputs."""
    tmp, root, cache, teacher, teacher_inputs = cached
    mean, std = normalization(create_teacher(teacher, torch.device("cpu")).preprocess)
    ctx = context((tmp, root, cache), steps=3)
    ctx.targets = load_dataset_targets(root, cache, views=True)[1]
    ctx.data_cfg = DataConfig(32, mean, std)
    loader = prepare_data(ctx, 0, 0)
    targets_of = batch_targets(ctx)
    for images, rows, ks in loader:
        for image, r, k in zip(images, rows.tolist(), ks.tolist()):
            assert torch.equal(image, teacher_inputs[VIEWS * r + k])
        targets = targets_of(rows, ks)
        expected = np.stack([ctx.targets.views.embedding[r, k] for r, k in zip(rows.tolist(), ks.tolist())]).astype(np.float32)
        assert torch.equal(targets.image, torch.from_numpy(expected)) and targets.image.dtype == torch.float32
        assert not torch.equal(targets.image, ctx.targets.image[rows])  # the view's target, not the plain image's
    # at the student's own size and normalisation: the same view (same parameters), rendered for it
    ctx.data_cfg = DataConfig(24, (0.5,) * 3, (0.25,) * 3)
    images, rows, ks = next(iter(prepare_data(ctx, 0, 0)))
    r, k = int(rows[0]), int(ks[0])
    params = ViewParams.from_array(ctx.targets.views.params.array[r, k])
    assert torch.equal(images[0], render_view(load_rgb(root / ctx.index.files[r].path), params, 24, (0.5,) * 3, (0.25,) * 3))


# --- --views off and version-2 caches -------------------------------------------------------------


def test_views_off_and_a_version_2_cache_train_as_before_views(cached):
    tmp, root, cache, *_ = cached
    flags = {**FLAGS, "test_envs": ("photo",)}
    old = as_version_2(cache, tmp / "cache-v2")
    v2_dir, _ = train_method("align", root, flags, tmp / "runs" / "v2", old)
    off_dir, _ = train_method("align", root, {**flags, "views": "off"}, tmp / "runs" / "off", cache)
    assert records(v2_dir / "env1") == records(off_dir / "env1")  # the plain target, torchvision's augmentation
    assert weights_equal(load_checkpoint(v2_dir / "env1" / "swad.pt"), load_checkpoint(off_dir / "env1" / "swad.pt"))
    assert runs.run_info(v2_dir)["views"] is None and runs.run_info(off_dir)["views"] is None
    assert not list(old.glob("views-*.npy")) and not (off_dir / "features").exists()
    on_dir, _ = train_method("align", root, {**flags, "fast_align": "off"}, tmp / "runs" / "on", cache)
    assert runs.run_info(on_dir)["views"] == {"count": VIEWS, "seed": 0}
    assert records(on_dir / "env1") != records(off_dir / "env1")


def test_erm_given_a_views_cache_trains_on_its_views(cached, caplog):
    tmp, root, cache, *_ = cached
    with caplog.at_level(logging.INFO, logger="vl2v.train"):
        run_dir, _ = train_method("erm", root, {**FLAGS, "steps": 2, "test_envs": ("art",)}, tmp / "runs" / "erm", cache)
    assert runs.run_info(run_dir)["views"] == {"count": VIEWS, "seed": 0}
    assert "training on the cache's 3 views per image (--views auto)" in caplog.text
    assert "fast Align" not in caplog.text  # ERM trains its featurizer: nothing to say


# --- fast Align -----------------------------------------------------------------------------------


def test_fast_align_equals_per_step_align(cached, caplog):
    tmp, root, cache, *_ = cached
    with caplog.at_level(logging.INFO, logger="vl2v"):
        fast_dir, fast = train_method("align", root, FLAGS, tmp / "runs" / "fast", cache)
    assert "fast Align: computing the featurizer's features of 135 training views (45 images × 3) and 54 evaluation images once" in caplog.text
    assert "(fast Align: cached features)" in caplog.text
    step_dir, step = train_method("align", root, {**FLAGS, "fast_align": "off"}, tmp / "runs" / "per-step", cache)
    assert not (step_dir / "features").exists()
    for env in ("env0", "env1"):
        assert_records_close(records(fast_dir / env), records(step_dir / env))
        for name in ("best.pt", "swad.pt"):
            a, b = load_checkpoint(fast_dir / env / name), load_checkpoint(step_dir / env / name)
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a), (env, name)
    assert_records_close([f for d in fast.values() for f in d.values()], [f for d in step.values() for f in d.values()])
    # random-init students: each held-out domain's featurizer has its own weights, so its own features
    (folder_a, folder_b) = sorted((fast_dir / "features").iterdir())
    meta = json.loads((folder_a / "meta.json").read_text())
    assert meta["student"] == "test_vit" and meta["view_count"] == VIEWS and meta["image_size"] == 32
    assert json.loads((folder_b / "meta.json").read_text())["weights"] != meta["weights"]
    train = np.load(next(folder_a.glob("train-*.npy")))
    assert train.shape == (45 * VIEWS, 64) and not list(folder_a.glob(".*tmp"))


def test_fast_align_is_refused_with_batchnorm_in_training_mode(cached, caplog):
    tmp, root, cache, *_ = cached
    flags = {**FLAGS, "student": "test_resnet", "model_kwargs": {"zero_init_last": False}, "freeze_bn": False, "steps": 2, "test_envs": ("art",)}
    with caplog.at_level(logging.INFO, logger="vl2v.train"):
        run_dir, _ = train_method("align", root, flags, tmp / "runs" / "bn", cache)
    assert ("fast Align does not apply: its BatchNorm layers train in training mode (--no-freeze-bn), so its features depend on the batch; "
            "the featurizer runs at every step.") in caplog.text
    assert not (run_dir / "features").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vl2v.train"):
        train_method("align", root, {**FLAGS, "steps": 2, "test_envs": ("art",), "views": "off"}, tmp / "runs" / "noviews", cache)
    assert "fast Align does not apply: it needs cached views (`vl2v embed --views K`, training with --views auto)" in caplog.text


def test_swad_segments_average_the_trainable_parameters_as_torch_does_and_keep_the_frozen():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)  # as Align's featurizer
    ours, torchs = segment_average(model), AveragedModel(model)
    frozen = model[0].weight.clone()
    for _ in range(4):
        with torch.no_grad():
            model[1].weight.add_(torch.randn(2, 3))
        ours.update_parameters(model)
        torchs.update_parameters(model)
    assert torch.equal(ours.module[1].weight, torchs.module[1].weight) and torch.equal(ours.module[1].bias, torchs.module[1].bias)
    assert torch.equal(ours.module[0].weight, frozen) and not torch.equal(ours.module[1].weight, model[1].weight)


def test_a_feature_file_resumes_where_a_killed_build_stopped(tmp_path):
    inputs = [torch.randn(4, 3) for _ in range(5)]  # 5 batches of 4 rows
    weight = torch.randn(3, 2)
    calls = []

    def forward(x):
        calls.append(len(x))
        return (x @ weight).numpy()

    def killed_after_two(x):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(x)

    path, progress = tmp_path / "f.npy", tmp_path / ".f.npy.progress.json"
    with pytest.raises(KeyboardInterrupt):
        build_features(path, (20, 2), lambda start: inputs[start:], 4, killed_after_two)
    assert not path.exists() and json.loads(progress.read_text()) == {"done": 8}
    calls.clear()
    resumed = build_features(path, (20, 2), lambda start: inputs[start:], 4, forward)
    assert calls == [4, 4, 4]  # only the three batches not yet written
    np.testing.assert_array_equal(resumed, (torch.cat(inputs) @ weight).numpy())
    assert not progress.exists() and not (tmp_path / ".f.npy.tmp").exists()


def test_a_resumed_fast_align_run_equals_an_uninterrupted_one(cached, monkeypatch):
    tmp, root, cache, *_ = cached
    flags = {**FLAGS, "test_envs": ("sketch",)}
    ref_dir, _ = train_method("align", root, flags, tmp / "runs" / "fast-ref", cache)
    saves = []
    real = runs.save_state

    def stop_after_second(*args, **kwargs):
        real(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as a kill right after the checkpoint of step 2

    monkeypatch.setattr(runs, "save_state", stop_after_second)
    with pytest.raises(KeyboardInterrupt):
        train_method("align", root, flags, tmp / "runs" / "fast-resumed", cache)
    monkeypatch.setattr(runs, "save_state", real)
    run_dir, _ = train_method("align", root, flags, tmp / "runs" / "fast-resumed", cache)
    assert records(run_dir / "env2") == records(ref_dir / "env2")
    assert weights_equal(load_checkpoint(run_dir / "env2" / "swad.pt"), load_checkpoint(ref_dir / "env2" / "swad.pt"))


def test_a_run_resumed_on_a_cache_whose_views_changed_is_refused(cached):
    tmp, root, cache, teacher, _ = cached
    flags = {**FLAGS, "steps": 1, "test_envs": ("art",)}
    plain = as_version_2(cache, tmp / "cache-changed")
    run_dir, _ = train_method("align", root, flags, tmp / "runs" / "changed", plain)
    embed_dataset(scan_dataset(root), plain, EmbedConfig(teacher=teacher, workers=0, device="cpu", batch_size=32, views=1))
    assert [p.name for p in list_view_shards(plain)] == ["views-k0000-0001-00000.h5"]
    with pytest.raises(UserError, match=r"already holds a run with other settings \(views differs\)"):
        train_method("align", root, flags, run_dir, plain)
    with pytest.raises(UserError, match=r"^--views must be auto or off, not 'on'\.$"):
        TrainConfig(views="on")


def test_a_run_from_before_views_resumes(cached):
    """A run written before `views` and `fast_align` were settings resumes: it ran as their defaults."""
    tmp, root, cache, _, _ = cached
    flags = {**FLAGS, "steps": 3, "test_envs": ("art",)}
    run_dir, _ = train_method("align", root, flags, tmp / "runs" / "older", cache)
    info = json.loads((run_dir / "config.json").read_text())
    for key in ("views", "fast_align"):
        del info["config"][key]
    (run_dir / "config.json").write_text(json.dumps(info))
    _, again = train_method("align", root, flags, run_dir, cache)
    assert again["art"] == json.loads((run_dir / "env0" / "done.json").read_text())
    info["config"]["lr"] = 1.0
    (run_dir / "config.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"other settings \(lr: 1\.0 → 0\.003\)"):
        train_method("align", root, flags, run_dir, cache)


# --- the command line -----------------------------------------------------------------------------


def test_views_and_fast_align_from_the_cli(tmp_path, tiny_teacher, monkeypatch):
    root = make_dataset(tmp_path / "toy", per_class=3)
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    embed = ok_json("embed", root, "--teacher", tiny_teacher, "--workers", "0", "--batch-size", "16", "--views", "2")
    assert (embed["views"], embed["views_embedded"], embed["plan"]["queries"]) == (2, 54, 27 + 54 + 3)
    args = ["align", root, *CLI_TINY, "--teacher", tiny_teacher, "--steps", "3", "--checkpoint-freq", "2", "--test-env", "art"]
    fast = ok_json(*args, "--run-dir", tmp_path / "fast")
    step = ok_json(*args, "--run-dir", tmp_path / "per-step", "--fast-align", "off")
    assert fast["art"]["SWAD"]["tr_outloss"] == pytest.approx(step["art"]["SWAD"]["tr_outloss"], abs=1e-5)
    assert (tmp_path / "fast" / "features").is_dir() and not (tmp_path / "per-step" / "features").exists()
    assert runs.run_info(tmp_path / "fast")["config"]["views"] == "auto" and runs.run_info(tmp_path / "fast")["views"]["count"] == 2
    bad = invoke(*args, "--run-dir", tmp_path / "bad", "--fast-align", "sometimes")
    assert bad.exit_code == 2 and "--fast-align must be auto or off, not 'sometimes'." in bad.stderr
