"""The training loop from the cache: no teacher, seeded batches, same seed same records, BatchNorm, SWAD wiring."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from conftest import make_cached_toy, train_method

import vl2v.embed
import vl2v.teacher
import vl2v.train
from vl2v import pipeline, runs
from vl2v.batches import StepBatches, step_loader
from vl2v.cache import load_dataset_targets
from vl2v.config import TrainConfig
from vl2v.data import all_splits, build_eval_transform, load_rgb
from vl2v.methods import get_method
from vl2v.runtime import UserError, load_checkpoint
from vl2v.student import DataConfig
from vl2v.train import Context, prepare_data

TINY = dict(student="test_vit", pretrained=False, image_size=32, batch_size=4, workers=0, device="cpu")
STRIP = ("step_time",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small dataset (3 domains × 3 classes × 6 images) and its tiny-teacher cache."""
    tmp = tmp_path_factory.mktemp("train")
    root, cache = make_cached_toy(tmp, per_class=6)
    return tmp, root, cache


def records(env_path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in STRIP} for r in runs.read_records(env_path)]


def checkpoints(env_path: Path) -> list[dict]:
    return [r for r in records(env_path) if r["kind"] == "checkpoint"]


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher must not be built during training")

    for module, name in [(open_clip, "create_model"), (open_clip, "create_model_and_transforms"), (vl2v.teacher, "create_teacher"), (vl2v.embed, "create_teacher")]:
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def trained(setup):
    """Align then Distill (held-out 'art', SWAD on) with every way of building a teacher broken."""
    tmp, root, cache = setup
    flags = {**TINY, "steps": 7, "checkpoint_freq": 2, "lr": 3e-3, "test_envs": ("art",)}
    with pytest.MonkeyPatch.context() as mp:
        no_teacher(mp)
        align_dir, align_finals = train_method("align", root, flags, tmp / "runs" / "align", cache)
        distill_flags = {k: v for k, v in flags.items() if k not in ("student", "pretrained", "image_size")}
        distill_dir, distill_finals = train_method("distill", None, distill_flags, tmp / "runs" / "distill", from_run=align_dir)
    return align_dir, align_finals, distill_dir, distill_finals


# --- the teacher is never loaded ------------------------------------------------------------------


def test_align_and_distill_train_from_the_cache_alone(trained, setup):
    align_dir, align_finals, distill_dir, distill_finals = trained
    for run_dir, finals in ((align_dir, align_finals), (distill_dir, distill_finals)):
        assert list(finals) == ["art"]
        assert set(finals["art"]) == {"training-domain validation", "SWAD"}
        done = json.loads((run_dir / "env0" / "done.json").read_text())
        assert done == finals["art"]
        assert not (run_dir / "env0" / "checkpoint.pt").exists()  # resume state removed when done
        assert not (run_dir / "env1").exists() and not (run_dir / "env2").exists()  # only --test-env art
    info = runs.run_info(distill_dir)
    assert info["config"]["method"] == "distill" and info["from_run"] == str(align_dir.resolve())


def test_head_is_the_cached_class_embeddings_times_logit_scale(trained, setup):
    _, root, cache = setup
    align_dir, _, distill_dir, _ = trained
    _, targets = load_dataset_targets(root, cache)
    assert targets.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # a random-init open_clip: exp(log(1/0.07))
    for run_dir in (align_dir, distill_dir):
        for name in ("best.pt", "swad.pt"):
            state = load_checkpoint(run_dir / "env0" / name)
            assert torch.allclose(state["head.classifier"], targets.text * targets.logit_scale), (run_dir, name)


def test_distill_keeps_the_align_projection_and_trains_the_featurizer(trained):
    align_dir, _, distill_dir, _ = trained
    start = load_checkpoint(align_dir / "env0" / "best.pt")
    for name in ("best.pt", "swad.pt"):
        end = load_checkpoint(distill_dir / "env0" / name)
        assert torch.equal(end["head.projection.weight"], start["head.projection.weight"])
        assert torch.equal(end["head.projection.bias"], start["head.projection.bias"])
        changed = [k for k in end if k.startswith("featurizer.") and not torch.equal(end[k], start[k])]
        assert len(changed) > 10, changed


def test_align_trains_the_projection_only(trained, setup):
    align_dir, *_ = trained
    best, swad = load_checkpoint(align_dir / "env0" / "best.pt"), load_checkpoint(align_dir / "env0" / "swad.pt")
    feats = [k for k in best if k.startswith("featurizer.")]
    assert feats and all(torch.equal(best[k], swad[k]) for k in feats)  # the featurizer never moved
    assert not torch.equal(best["head.projection.weight"], swad["head.projection.weight"])


# --- SWAD wiring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["align", "distill"])
def test_swad_and_validation_selection_records(trained, stage):
    align_dir, _, distill_dir, _ = trained
    env_path = (align_dir if stage == "align" else distill_dir) / "env0"
    assert (env_path / "swad.pt").exists() and (env_path / "best.pt").exists()
    assert not weights_equal(load_checkpoint(env_path / "swad.pt"), load_checkpoint(env_path / "best.pt"))

    lines = records(env_path)
    ckpts = [r for r in lines if r["kind"] == "checkpoint"]
    finals = [r for r in lines if r["kind"] == "final"]
    assert [r["step"] for r in ckpts] == [0, 2, 4, 6]  # every checkpoint_freq steps and the last step
    assert lines[-2:] == finals and [f["selection"] for f in finals] == ["training-domain validation", "SWAD"]
    for f in finals:
        assert f["test_env"] == 0 and f["test_domain"] == "art"
        assert 0.0 <= f["test_in_acc"] <= 1.0 and 0.0 <= f["test_acc"] <= 1.0
    for r in ckpts:
        assert {"loss", "env0_in_acc", "env0_out_acc", "env1_in_acc", "env2_out_acc", "test_acc", "tr_outacc", "tr_outloss"} <= r.keys()
        assert r["tr_outacc"] == pytest.approx((r["env1_out_acc"] + r["env2_out_acc"]) / 2)  # training domains only
    tdv, swad = finals
    best = max(ckpts, key=lambda r: r["tr_outacc"])  # first of equals, as the loop keeps it
    assert tdv["step"] == best["step"] and tdv["tr_outacc"] == best["tr_outacc"]
    assert tdv["test_in_acc"] == best["env0_in_acc"] and tdv["test_acc"] == best["test_acc"]
    assert swad["step"] == ckpts[-1]["step"]
    done = json.loads((env_path / "done.json").read_text())
    assert done == {"training-domain validation": tdv, "SWAD": swad}


@pytest.mark.parametrize(
    "losses, swad_of",
    [
        # falling loss: never converges, so SWAD is the last segment (steps 5-6) averaged
        ([4.0, 3.0, 2.0, 1.0], lambda w: (w[5] + w[6]) / 2),
        # rising loss: converges at step 0 (threshold 2.6); the valley holds segment {0} and then
        # segment {1, 2} (the tail rule), each segment reset at its checkpoint (standard SWAD)
        ([1.0, 2.0, 3.0, 4.0], lambda w: (w[0] + (w[1] + w[2]) / 2) / 2),
    ],
)
def test_swad_and_selection_wiring_with_scripted_validation(setup, monkeypatch, losses, swad_of):
    """Scripted tr_outacc / tr_outloss: best.pt is the model at the max-tr_outacc checkpoint and
    swad.pt the average of the per-step weights of the segments SWAD keeps."""
    tmp, root, cache = setup
    accs = [0.1, 0.7, 0.9, 0.9]  # max first reached at the third checkpoint (step 4)
    real_evaluate, seen = vl2v.train.evaluate, []

    def scripted(ctx, model, env):
        record = real_evaluate(ctx, model, env)
        if len(seen) < len(accs):  # the SWAD model's evaluation comes after the 4 checkpoints
            record.update(tr_outacc=accs[len(seen)], tr_outloss=losses[len(seen)])
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, record))
        return record

    steps_w = []

    class Recording(vl2v.train.AveragedModel):
        def update_parameters(self, model):
            steps_w.append(model.head.projection.weight.detach().clone())
            return super().update_parameters(model)

    monkeypatch.setattr(vl2v.train, "evaluate", scripted)
    monkeypatch.setattr(vl2v.train, "AveragedModel", Recording)
    flags = {**TINY, "steps": 7, "checkpoint_freq": 2, "lr": 1e-2, "test_envs": ("photo",), "model_save": 0}
    run_dir, finals = train_method("align", root, flags, tmp / "scripted" / str(losses[0]), cache)
    assert len(seen) == 5 and len(steps_w) == 7  # 4 checkpoints + the SWAD model; one update per step

    tdv, swad = finals["photo"]["training-domain validation"], finals["photo"]["SWAD"]
    _, best_record = seen[2]
    assert tdv["step"] == 4 and tdv["tr_outacc"] == 0.9
    assert tdv["test_in_acc"] == best_record["env1_in_acc"] and tdv["test_acc"] == best_record["test_acc"]
    # best.pt (what Distill starts from) takes the tie at 0.9 by the later checkpoint (step 6)
    assert weights_equal(load_checkpoint(run_dir / "env1" / "best.pt"), seen[3][0])

    swad_state = load_checkpoint(run_dir / "env1" / "swad.pt")
    assert torch.allclose(swad_state["head.projection.weight"], swad_of(steps_w), atol=1e-6)
    assert not torch.allclose(swad_state["head.projection.weight"], steps_w[6], atol=1e-4)
    assert weights_equal(swad_state, seen[4][0])  # the SWAD record evaluates exactly swad.pt
    assert swad["step"] == 6 and swad["test_in_acc"] == seen[4][1]["env1_in_acc"]


def test_no_swad_means_validation_selection_only(setup):
    tmp, root, cache = setup
    run_dir, finals = train_method("align", root, {**TINY, "steps": 2, "checkpoint_freq": 1, "swad": False, "test_envs": ("sketch",)}, tmp / "noswad", cache)
    assert list(finals["sketch"]) == ["training-domain validation"]
    assert not (run_dir / "env2" / "swad.pt").exists() and (run_dir / "env2" / "best.pt").exists()
    assert [r["selection"] for r in records(run_dir / "env2") if r["kind"] == "final"] == ["training-domain validation"]


# --- batches --------------------------------------------------------------------------------------


def context(setup, **kw) -> Context:
    tmp, root, cache = setup
    cfg = TrainConfig(**{**TINY, "steps": 8, **kw})
    index, targets = load_dataset_targets(root, cache)
    labels = torch.tensor([f.label for f in index.files])
    data_cfg = DataConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    splits = all_splits(index, cfg.trial_seed, cfg.holdout)
    return Context(cfg, get_method(cfg.method), tmp / "unused", index, targets, splits, labels, torch.device("cpu"), None, None, None, data_cfg=data_cfg)


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), rows.clone()) for images, rows, _ in loader]


def test_step_batches_are_a_pure_function_of_seed_env_and_step(setup):
    ctx = context(setup)
    serial = batches_of(prepare_data(ctx, 1, 0))
    assert len(serial) == 8
    assert all(images.shape == (8, 3, 32, 32) and rows.shape == (8,) for images, rows in serial)  # 4 per training domain

    ctx.cfg = TrainConfig(**{**TINY, "steps": 8, "workers": 2})
    parallel = batches_of(prepare_data(ctx, 1, 0))
    resumed = batches_of(prepare_data(ctx, 1, 5))  # a run resumed at step 5, with workers
    assert len(parallel) == 8 and len(resumed) == 3
    for (a_img, a_rows), (b_img, b_rows) in zip(serial, parallel):
        assert torch.equal(a_rows, b_rows) and torch.equal(a_img, b_img)
    for (a_img, a_rows), (b_img, b_rows) in zip(serial[5:], resumed):
        assert torch.equal(a_rows, b_rows) and torch.equal(a_img, b_img)

    # steps differ from each other; another seed or another held-out domain gives other batches
    assert not torch.equal(serial[0][0], serial[1][0])
    ctx.cfg = TrainConfig(**{**TINY, "steps": 8, "seed": 1})
    other_seed = batches_of(prepare_data(ctx, 1, 0))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(serial, other_seed))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(serial, other_seed))


def test_batch_rows_come_from_each_training_domains_in_split(setup):
    ctx = context(setup, steps=40, batch_size=5)
    out_rows = np.concatenate([ctx.splits[f"env{d}_out"] for d in range(3)])
    for env in range(3):
        batches = prepare_data(ctx, env, 0).dataset
        train_domains = [d for d in range(3) if d != env]
        seen = {d: set() for d in train_domains}
        for step in range(40):
            rows, *_ = batches.rows(step)
            assert len(rows) == 10
            for k, d in enumerate(train_domains):  # concatenated in domain order
                chunk = rows[k * 5 : (k + 1) * 5]
                assert set(chunk) <= set(ctx.splits[f"env{d}_in"].tolist()), (env, step, d)
                assert all(ctx.index.files[r].domain == d for r in chunk)
                seen[d] |= set(chunk.tolist())
            assert not set(rows) & set(out_rows.tolist())
            assert not any(ctx.index.files[r].domain == env for r in rows)
        for d in train_domains:  # with replacement over the whole in split: 200 draws of 15 rows reach them all
            assert seen[d] == set(ctx.splits[f"env{d}_in"].tolist())


def test_batch_images_are_the_images_of_their_rows(setup):
    ctx = context(setup)
    paths = [f.path for f in ctx.index.files]
    rows = [ctx.splits["env0_in"], ctx.splits["env2_in"]]
    plain = build_eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    batches = StepBatches(ctx.index.root, paths, rows, 3, plain, (0, 1), 0, 4)
    for images, batch_rows, _ in step_loader(batches, 0, False):
        for image, row in zip(images, batch_rows.tolist()):
            assert torch.equal(image, plain(load_rgb(ctx.index.root / paths[row])))


# --- same seed, same run --------------------------------------------------------------------------


def test_same_seed_same_records_other_seed_differs(setup):
    tmp, root, cache = setup
    flags = {**TINY, "steps": 5, "checkpoint_freq": 2, "lr": 3e-3, "test_envs": ("photo",)}
    results = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.manual_seed(1000 + len(results))  # whatever state the process is in: the run seeds itself
        run_dir, _ = train_method("align", root, {**flags, "seed": seed}, tmp / "seeds" / name, cache)
        results[name] = (records(run_dir / "env1"), load_checkpoint(run_dir / "env1" / "swad.pt"))
    assert results["a"][0] == results["b"][0]
    assert weights_equal(results["a"][1], results["b"][1])
    a_losses = [r["loss"] for r in results["a"][0] if r["kind"] == "checkpoint"]
    c_losses = [r["loss"] for r in results["c"][0] if r["kind"] == "checkpoint"]
    assert len(a_losses) == len(c_losses) == 3 and all(x != y for x, y in zip(a_losses, c_losses))
    assert not weights_equal(results["a"][1], results["c"][1])


def test_held_out_domain_result_does_not_depend_on_the_others_trained_before(setup):
    """Leave-one-domain-out runs are independent: env2 alone equals env2 after env0 and env1."""
    tmp, root, cache = setup
    flags = {**TINY, "steps": 2, "checkpoint_freq": 1}
    alone, _ = train_method("align", root, {**flags, "test_envs": ("sketch",)}, tmp / "order" / "alone", cache)
    every, _ = train_method("align", root, flags, tmp / "order" / "every", cache)
    assert records(alone / "env2") == records(every / "env2")


# --- BatchNorm stays frozen -----------------------------------------------------------------------


def test_batchnorm_stays_in_eval_mode_and_keeps_its_statistics(setup, monkeypatch):
    tmp, root, cache = setup
    modes = []
    real = vl2v.train.build_student

    def create_with_hooks(*args, **kwargs):
        model, data_cfg = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(lambda mod, inp, root=model: modes.append((root.training, mod.training)))
        return model, data_cfg

    monkeypatch.setattr(vl2v.train, "build_student", create_with_hooks)
    flags = {**TINY, "student": "test_resnet", "model_kwargs": {"zero_init_last": False}, "steps": 3, "checkpoint_freq": 2, "lr": 1e-2, "test_envs": ("photo",)}
    align_dir, _ = train_method("align", root, flags, tmp / "bn" / "align", cache)
    distill_flags = {k: v for k, v in flags.items() if k not in ("student", "pretrained", "image_size", "model_kwargs")}
    distill_dir, _ = train_method("distill", None, distill_flags, tmp / "bn" / "distill", from_run=align_dir)

    training = [bn for model, bn in modes if model]
    assert len(training) > 0 and not any(training)  # every BatchNorm call in a training step: eval mode
    assert any(not model for model, _ in modes)  # evaluation ran too

    init = load_checkpoint(align_dir / "env1" / "best.pt")
    bn_keys = [k for k in init if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    affine = [k[: -len("running_mean")] + "weight" for k in init if k.endswith("running_mean")]
    assert bn_keys and affine
    assert all(float(init[k].abs().sum()) == 0 for k in bn_keys if k.endswith(("running_mean", "num_batches_tracked")))
    for name in ("best.pt", "swad.pt"):
        for run_dir in (align_dir, distill_dir):
            state = load_checkpoint(run_dir / "env1" / name)
            assert all(torch.equal(state[k], init[k]) for k in bn_keys), (run_dir, name)
    distilled = load_checkpoint(distill_dir / "env1" / "swad.pt")
    assert all(not torch.equal(distilled[k], init[k]) for k in affine)  # affine weights train in Distill


def test_swad_model_gets_its_own_batchnorm_statistics_when_bn_is_not_frozen(setup):
    tmp, root, cache = setup
    flags = {**TINY, "student": "test_resnet", "model_kwargs": {"zero_init_last": False}, "steps": 5, "checkpoint_freq": 2, "freeze_bn": False, "test_envs": ("photo",)}
    run_dir, _ = train_method("align", root, flags, tmp / "bn_train", cache)
    swad, best = load_checkpoint(run_dir / "env1" / "swad.pt"), load_checkpoint(run_dir / "env1" / "best.pt")
    counts = [k for k in swad if k.endswith("num_batches_tracked")]
    assert counts and all(int(swad[k]) == 5 for k in counts)  # re-estimated over min(steps, 32) batches
    assert all(int(best[k]) > 0 for k in counts)  # BN in training mode updated its statistics
    means = [k for k in swad if k.endswith("running_mean")]
    assert any(not torch.equal(swad[k], best[k]) for k in means)


def test_warmup_ramps_the_learning_rate_and_resumes_exactly(setup, monkeypatch):
    tmp, root, cache = setup
    flags = {**TINY, "steps": 6, "checkpoint_freq": 2, "lr": 5e-3, "warmup_steps": 4, "swad": False, "test_envs": ("art",)}
    seen, real_step = [], torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    ref_dir, _ = train_method("align", root, flags, tmp / "runs" / "warm-ref", cache)
    assert seen == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 5e-3])
    saves, real_save = [], runs.save_state

    def stop_after_second(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as a kill right after the checkpoint of step 2, mid warm-up

    monkeypatch.setattr(runs, "save_state", stop_after_second)
    with pytest.raises(KeyboardInterrupt):
        train_method("align", root, flags, tmp / "runs" / "warm-resumed", cache)
    monkeypatch.setattr(runs, "save_state", real_save)
    seen.clear()
    run_dir, _ = train_method("align", root, flags, tmp / "runs" / "warm-resumed", cache)
    assert seen == pytest.approx([4e-3, 5e-3, 5e-3])  # steps 3..5, from the step alone
    assert records(run_dir / "env0") == records(ref_dir / "env0")
    assert weights_equal(load_checkpoint(run_dir / "env0" / "best.pt"), load_checkpoint(ref_dir / "env0" / "best.pt"))
    with pytest.raises(Exception, match=r"--warmup-steps must be ≥ 0, not -1\."):
        TrainConfig(warmup_steps=-1)


def test_a_second_process_training_the_same_run_is_refused(setup, tmp_path):
    tmp, root, cache = setup
    env_path = tmp_path / "run" / "env0"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(env_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        flags = {**TINY, "steps": 2, "test_envs": ("art",)}
        with pytest.raises(UserError, match=rf"^Another vl2v process is training {re.escape(str(env_path))} \(it holds .*\.train\.lock\)\. Wait for it to finish, or pass another --run-dir\.$"):
            train_method("align", root, flags, tmp_path / "run", cache)
        assert not (env_path / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    _, finals = train_method("align", root, flags, tmp_path / "run", cache)  # a killed holder's lock is gone
    assert finals["art"]["SWAD"]["step"] == 1


HOLD_LOCK = """
import sys, time
from vl2v.runs import training_lock
from pathlib import Path
with training_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_eval_splits_selection_validates_only_what_selection_reads(setup):
    tmp, root, cache = setup
    flags = {**TINY, "steps": 5, "checkpoint_freq": 2, "lr": 3e-3, "test_envs": ("art",)}
    every_dir, every = train_method("align", root, flags, tmp / "runs" / "eval-all", cache)
    few_dir, few = train_method("align", root, {**flags, "eval_splits": "selection"}, tmp / "runs" / "eval-selection", cache)
    assert few == every  # the same selections, SWAD and figures
    few_records, every_records = checkpoints(few_dir / "env0"), checkpoints(every_dir / "env0")
    assert {k for k in few_records[0] if k.endswith("_acc")} == {"env0_in_acc", "env0_out_acc", "env1_out_acc", "env2_out_acc", "test_acc"}
    assert every_records[0].keys() - few_records[0].keys() == {"env1_in_acc", "env2_in_acc"}
    assert few_records == [{k: r[k] for k in f} for f, r in zip(few_records, every_records)]
    with pytest.raises(UserError, match=r"^--eval-splits must be one of all, selection, not 'some'\.$"):
        TrainConfig(eval_splits="some")
