"""Query budgets: the plan checked before paying, stratified subsets, training from a subset cache."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dataset
from vl2v.budget import Plan, plan_queries, stratified_order
from vl2v.cache import load_dataset_targets, load_targets
from vl2v.cli import app
from vl2v.config import TrainConfig
from vl2v.data import all_splits, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.runtime import UserError
from vl2v.student import DataConfig
from vl2v.methods import get_method
from vl2v.train import Context, eval_images, prepare_data


def config(teacher: str, **kw) -> EmbedConfig:
    return EmbedConfig(teacher=teacher, **{"workers": 0, "device": "cpu", "batch_size": 8, **kw})


def strata(index, rows) -> Counter:
    return Counter((index.files[r].domain, index.files[r].label) for r in rows)


def test_every_prefix_of_the_order_is_stratified(tmp_path):
    # unequal strata: 3 domains × 3 classes, a domain with twice the images of the others
    root = make_dataset(tmp_path / "toy", per_class=4)
    make_dataset(root, domains=("photo",), per_class=8)
    index = scan_dataset(root)
    order = stratified_order(index, index.good)
    assert sorted(order) == sorted(index.good.tolist())
    assert order == stratified_order(index, list(reversed(index.good.tolist())))  # the dataset decides, not the input order
    sizes = strata(index, index.good)
    for n in range(1, len(order) + 1):
        got = strata(index, order[:n])
        for key, size in sizes.items():
            assert abs(got[key] - n * size / len(order)) <= 1, (n, key)  # proportional to within one image


def test_plan_within_over_and_subset(tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    pending = index.good.tolist()
    plan, rows, view_rows = plan_queries(index, pending, 3, 0, 39)
    assert (plan, rows, view_rows) == (Plan(36, 3, 0, 0, 39), pending, []) and plan.queries == 39
    assert str(plan) == "plan: 36 images + 3 prompts = 39 queries to pay (0 images cached; --max-queries 39)"
    with pytest.raises(UserError, match=r"^plan: 36 images \+ 3 prompts = 39 queries to pay \(0 images cached; --max-queries 38\), over the budget\. Options: --max-queries 39"):
        plan_queries(index, pending, 3, 0, 38)
    plan, rows, _ = plan_queries(index, pending, 3, 0, 21, "subset")
    assert plan == Plan(18, 3, 0, 18, 21) and len(rows) == 18 and rows == sorted(rows)
    assert set(strata(index, rows).values()) == {2}  # 9 equal strata: 2 images each
    with pytest.raises(UserError) as e:
        plan_queries(index, pending, 3, 0, 2, "subset")
    assert str(e.value).endswith(": --max-queries 2 does not cover the 3 class prompts; raise it to at least 3.")


def test_views_are_queries_in_the_plan_and_the_subset(tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    pending = index.good.tolist()
    views = {r: 4 for r in pending}
    plan, rows, view_rows = plan_queries(index, pending, 3, 0, None, views=views)
    assert (rows, view_rows) == (pending, pending) and plan.queries == 36 + 36 * 4 + 3
    assert str(plan) == "plan: 36 images + 36 images × 4 views + 3 prompts = 183 queries to pay (0 images cached)"
    # raising K later: the images are cached, only the new views are paid
    plan, rows, view_rows = plan_queries(index, [], 0, 36, 72, views={r: 2 for r in pending})
    assert (rows, view_rows, plan.queries) == ([], pending, 72)
    assert str(plan) == "plan: 0 images + 36 images × 2 views + 0 prompts = 72 queries to pay (36 images cached; --max-queries 72)"
    with pytest.raises(UserError) as e:
        plan_queries(index, pending, 3, 0, 50, views=views)
    assert str(e.value) == (
        "plan: 36 images + 36 images × 4 views + 3 prompts = 183 queries to pay (0 images cached; --max-queries 50), over the budget. "
        "Options: --max-queries 183 to pay for all of it; --budget subset to embed 9 of the 36 images, each with its views, "
        "stratified by domain × class; or fewer prompt templates (--prompts) or views (--views)."
    )
    plan, rows, view_rows = plan_queries(index, pending, 3, 0, 50, "subset", views)  # 47 queries: 9 images with 4 views each
    assert plan == Plan(9, 3, 0, 27, 50, 36, 9) and plan.queries == 48 and rows == view_rows
    assert set(strata(index, rows).values()) == {1}


def test_subset_cache_trains_only_on_images_with_targets(tmp_path, tiny_teacher, caplog):
    root = make_dataset(tmp_path / "toy", per_class=6)  # 54 images, 3 prompts
    index = scan_dataset(root)
    first = embed_dataset(index, tmp_path / "cache", config(tiny_teacher, max_queries=21, budget="subset"))
    assert first.complete and (first.embedded, first.images_with_targets) == (18, 18)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["subset"] is True and manifest["images_with_targets"] == 18
    # a second subset run extends the first along the same order: the union is its first 30 images
    second = embed_dataset(index, tmp_path / "cache", config(tiny_teacher, max_queries=12, budget="subset"))
    assert (second.embedded, second.reused, second.text_queries) == (12, 18, 0)
    targets = load_targets(tmp_path / "cache", index)
    assert set(np.flatnonzero(targets.valid.numpy()).tolist()) == set(stratified_order(index, index.good)[:30])

    with caplog.at_level("INFO", logger="vl2v.cache"):
        index, targets = load_dataset_targets(root, tmp_path / "cache")
    assert "teacher targets for 30 of 54 usable images (a --budget subset cache): training draws only those" in caplog.text
    assert len(index.good) == 54  # images without targets are still evaluated
    cfg = TrainConfig(student="test_vit", pretrained=False, image_size=32, batch_size=6, workers=0, device="cpu", steps=30)
    labels = torch.tensor([f.label for f in index.files])
    ctx = Context(cfg, get_method(cfg.method), tmp_path / "unused", index, targets, all_splits(index, 0, 0.2), labels, torch.device("cpu"), None, None, None,
                  data_cfg=DataConfig(32, (0.5,) * 3, (0.5,) * 3))
    drawn = np.concatenate([prepare_data(ctx, 0, 0).dataset.rows(step)[0] for step in range(30)])
    assert targets.valid[drawn].all() and len(set(drawn.tolist())) > 10
    assert len(eval_images(ctx, 0).rows) == 54  # evaluation uses every image


def test_cli_over_budget_exits_2_with_the_plan(tmp_path, tiny_teacher, monkeypatch):
    root = make_dataset(tmp_path / "toy", per_class=1)
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["embed", str(root), "--teacher", tiny_teacher, "--workers", "0", "--max-queries", "5"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: plan: 9 images + 3 prompts = 12 queries to pay (0 images cached; --max-queries 5), over the budget. "
        "Options: --max-queries 12 to pay for all of it; --budget subset to embed 2 of the 9 images, stratified by "
        "domain × class; or fewer prompt templates (--prompts)."
    )
    assert not (tmp_path / "cache").exists()


def test_subset_needs_the_whole_dataset_in_one_process():
    with pytest.raises(UserError) as e:
        EmbedConfig(budget="subset", shard=(1, 2))
    assert str(e.value) == "--budget subset picks one subset of the whole dataset: run it without --shard and outside torchrun."
    with pytest.raises(UserError, match=r"^--budget must be refuse or subset, not 'some'\.$"):
        EmbedConfig(budget="some")
