"""`vl2v embed --views K`: the teacher embeds K augmented views per image, exactly as rendered; raising
K pays only the new views; kill -9 and resume; the view seed; version-2 caches."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dataset
from test_embed import h5_content, paid, slow_embed_child
from vl2v.cache import load_targets
from vl2v.cli import app
from vl2v.data import load_rgb, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.runtime import UserError
from vl2v.teacher import Teacher, create_teacher, normalization
from vl2v.viewcache import list_view_shards
from vl2v.views import ViewParams, render_view, stored_views

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def config(teacher: str, **kw) -> EmbedConfig:
    return EmbedConfig(teacher=teacher, **{"workers": 0, "device": "cpu", "batch_size": 8, **kw})


@pytest.fixture
def seen(monkeypatch) -> list[torch.Tensor]:
    """Every batch of inputs the local teacher embedded in this process."""
    batches: list[torch.Tensor] = []
    encode = Teacher.encode_images

    def recording(self, images):
        batches.append(images.clone())
        return encode(self, images)

    monkeypatch.setattr(Teacher, "encode_images", recording)
    return batches


def view_rows(cache_dir: Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """{(path, k): (stored embedding, stored parameters)} over every view shard."""
    out = {}
    for shard in list_view_shards(cache_dir):
        with h5py.File(shard, "r") as f:
            start = int(f.attrs["k_start"])
            for i, path in enumerate(p.decode() for p in f["path"][()]):
                for j in range(f["embedding"].shape[1]):
                    out[(path, start + j)] = (f["embedding"][i, j], f["params"][i, j])
    return out


def test_a_cached_view_is_the_teachers_embedding_of_the_view_rendered_for_it(dataset, tiny_teacher, tmp_path, seen, caplog):
    index = scan_dataset(dataset)
    with caplog.at_level(logging.INFO, logger="vl2v.embed"):
        report = embed_dataset(index, tmp_path / "cache", config(tiny_teacher, views=2))
    assert "plan: 36 images + 36 images × 2 views + 3 prompts = 111 queries to pay (0 images cached)" in caplog.text
    assert report.complete and (report.embedded, report.views, report.views_embedded) == (36, 2, 72)
    assert report.cost["image_queries"] == 36 and report.cost["view_queries"] == 72
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["queries"] == {"images": 36, "texts": 3}
    assert manifest["views"] == {"count": 2, "seed": 0, "queries": 72, "images_with_views": 36, "shards": ["views-k0000-0002-00000.h5"]}
    assert manifest["cost"]["view_queries"] == 72

    teacher = create_teacher(tiny_teacher, CPU)
    mean, std = normalization(teacher.preprocess)
    view_inputs = torch.cat(seen[5:])  # after the 5 image batches: 9 batches of 4 images × 2 views, in row order
    assert view_inputs.shape == (72, 3, 32, 32)
    stored = view_rows(tmp_path / "cache")
    assert len(stored) == 72
    for n, r in enumerate([0, 7, 35]):
        path = index.files[r].path
        image = load_rgb(dataset / path)
        for k in range(2):
            emb, params = stored[(path, k)]
            np.testing.assert_array_equal(params, stored_views(path, image.size, 0, range(2))[k])  # drawn from (seed, path, k)
            rendered = render_view(image, ViewParams.from_array(params), teacher.image_size, mean, std)
            assert torch.equal(view_inputs[2 * r + k], rendered)  # what the teacher saw, pixel for pixel
            now = teacher.encode_images(rendered[None])[0]
            torch.testing.assert_close(torch.from_numpy(emb.astype(np.float32)), now, atol=2e-3, rtol=0)  # fp16 storage

    views = load_targets(tmp_path / "cache", index, views=True).views
    assert views.count == 2 and views.embedding.shape == (36, 2, 16) and views.embedding.dtype == np.float16 and views.valid.all()
    assert np.array_equal(views.embedding[7, 1], stored[(index.files[7].path, 1)][0])
    assert torch.equal(views.gather(np.array([7, 0]), np.array([1, 0])), torch.from_numpy(np.stack([stored[(index.files[7].path, 1)][0], stored[(index.files[0].path, 0)][0]]).astype(np.float32)))
    assert load_targets(tmp_path / "cache", index).views is None  # only when asked for: zero-shot and eval need none


def test_raising_k_embeds_only_the_new_views(dataset, tiny_teacher, tmp_path, seen):
    index = scan_dataset(dataset)
    out = tmp_path / "cache"
    embed_dataset(index, out, config(tiny_teacher))  # a cache without views
    first = load_targets(out, index).image
    seen.clear()
    two = embed_dataset(index, out, config(tiny_teacher, views=2))
    assert (two.embedded, two.reused, two.views_embedded) == (0, 36, 72) and sum(len(b) for b in seen) == 72
    assert two.plan["queries"] == 72 and two.cost["image_queries"] == 0 and two.cost["view_queries"] == 72
    seen.clear()
    three = embed_dataset(index, out, config(tiny_teacher, views=3))
    assert three.views_embedded == 36 and sum(len(b) for b in seen) == 36  # view 2 of each image, nothing else
    seen.clear()
    again = embed_dataset(index, out, config(tiny_teacher))  # the cache keeps its 3 views; nothing to pay
    assert (again.embedded, again.views, again.views_embedded) == (0, 3, 0) and seen == [] and again.complete
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["views"]["shards"] == ["views-k0000-0002-00000.h5", "views-k0002-0003-00000.h5"]
    assert manifest["views"]["queries"] == 108 and manifest["cost"]["view_queries"] == 108 and manifest["cost"]["image_queries"] == 36
    targets = load_targets(out, index, views=True)
    assert torch.equal(targets.image, first) and targets.views.count == 3

    # views 0-1 are those a cache built with 2 views from the start holds (same seed, path, k)
    straight = embed_dataset(index, tmp_path / "straight", config(tiny_teacher, views=2))
    assert straight.complete
    a, b = view_rows(out), view_rows(tmp_path / "straight")
    assert all(np.array_equal(a[key][1], b[key][1]) and np.array_equal(a[key][0], b[key][0]) for key in b)


def test_the_cache_keeps_its_view_seed(dataset, tiny_teacher, tmp_path, seen):
    index = scan_dataset(dataset)
    embed_dataset(index, tmp_path / "cache", config(tiny_teacher, views=1, view_seed=5))
    seen.clear()
    with pytest.raises(UserError) as e:
        embed_dataset(index, tmp_path / "cache", config(tiny_teacher, views=2, view_seed=0))
    assert str(e.value) == f"{tmp_path / 'cache'} holds views drawn with --view-seed 5, not 0: leave --view-seed out (or pass 5), or pass another --cache-dir."
    assert seen == []  # refused before anything was paid
    assert embed_dataset(index, tmp_path / "cache", config(tiny_teacher, views=2)).views_embedded == 36
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["views"]["seed"] == 5
    path = index.files[3].path
    params = view_rows(tmp_path / "cache")[(path, 1)][1]
    np.testing.assert_array_equal(params, stored_views(path, load_rgb(dataset / path).size, 5, range(2))[1])


def test_touched_files_keep_their_views_without_a_query(dataset, tiny_teacher, tmp_path, seen):
    index = scan_dataset(dataset)
    embed_dataset(index, tmp_path / "cache", config(tiny_teacher, views=2))
    before = load_targets(tmp_path / "cache", index, views=True).views
    for f in index.files:  # as a copied dataset: the same bytes, new modification times
        os.utime(dataset / f.path, ns=(0, (dataset / f.path).stat().st_mtime_ns + 10**9))
    seen.clear()
    report = embed_dataset(scan_dataset(dataset), tmp_path / "cache", config(tiny_teacher))
    assert seen == [] and (report.embedded, report.views_embedded, report.views) == (0, 0, 2)
    recorded = [p for p in list_view_shards(tmp_path / "cache") if p.name != "views-k0000-0002-00000.h5"]
    assert [p.name for p in recorded] == ["views-k0000-0002-00001.h5"]
    with h5py.File(recorded[0], "r") as f:
        assert f.attrs["view_queries"] == 0 and len(f["path"]) == 36
    listed = scan_dataset(dataset, check_images=False)  # as training lists it: matched by the new times, nothing hashed
    after = load_targets(tmp_path / "cache", listed, views=True).views
    assert all(f.sha256 is None for f in listed.files)
    assert np.array_equal(after.embedding, before.embedding) and np.array_equal(after.params.array, before.params.array)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["views"]["queries"] == 72


def test_cli_embed_views_json(dataset, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    args = ["embed", str(dataset), "--teacher", tiny_teacher, "--workers", "0", "--batch-size", "8", "--views", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["views"], summary["views_embedded"]) == (36, 2, 72)
    assert summary["plan"]["queries"] == 111 and summary["plan"]["views"] == 72 and summary["cost"]["view_queries"] == 72
    assert CliRunner().invoke(app, [*args[:-1], "--views", "-1"]).exit_code == 2


# --- kill -9 and resume ---------------------------------------------------------------------------

N_IMAGES, SHARD, BATCH, VIEWS = 64, 8, 8, 2  # view batches: 4 images × 2 views; view shards: 8 images

def cache_files(cache_dir: Path) -> dict:
    shards = sorted([*cache_dir.glob("images-*.h5"), *list_view_shards(cache_dir)])
    return {
        "files": sorted(p.name for p in cache_dir.iterdir()),
        "shards": {p.name: h5_content(p) for p in shards},
        "text": h5_content(cache_dir / "text.h5"),
        "manifest": json.loads((cache_dir / "manifest.json").read_text()),
    }


def test_kill_9_during_a_views_embed_resumes_to_the_identical_cache(tmp_path, tiny_teacher, seen):
    root = make_dataset(tmp_path / "big", domains=("d0", "d1"), classes=("c0", "c1", "c2", "c3"), per_class=8)
    index = scan_dataset(root)
    assert len(index.files) == N_IMAGES
    killed, ledger = tmp_path / "killed", tmp_path / "ledger.txt"
    script = tmp_path / "child.py"
    script.write_text(slow_embed_child(BATCH, SHARD, VIEWS))
    child = subprocess.Popen([sys.executable, str(script), str(root), str(killed), tiny_teacher, str(ledger)], env={**os.environ, "PYTHONPATH": str(REPO)})
    views_per_shard = SHARD * VIEWS
    try:
        deadline = time.monotonic() + 120
        # kill it mid-view-shard: a view shard is whole on disk and a view batch of the next one is with the teacher
        while not (killed.is_dir() and list_view_shards(killed) and paid(ledger) > N_IMAGES + views_per_shard * len(list_view_shards(killed))):
            assert child.poll() is None, "the embed child exited before it could be killed"
            assert time.monotonic() < deadline, "no view shard written in time"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    whole = len(list_view_shards(killed))
    assert 1 <= whole < N_IMAGES // SHARD
    in_flight = paid(ledger) - N_IMAGES - whole * views_per_shard
    assert 0 < in_flight <= views_per_shard
    assert json.loads((killed / "manifest.json").read_text())["complete"] is False

    report = embed_dataset(index, killed, config(tiny_teacher, batch_size=BATCH, shard_size=SHARD, views=VIEWS))
    assert report.complete and (report.embedded, report.views_embedded) == (0, (N_IMAGES - whole * SHARD) * VIEWS)
    assert sum(len(b) for b in seen) == (N_IMAGES - whole * SHARD) * VIEWS  # only the views of unwritten shards

    embed_dataset(index, tmp_path / "straight", config(tiny_teacher, batch_size=BATCH, shard_size=SHARD, views=VIEWS))
    resumed, straight = cache_files(killed), cache_files(tmp_path / "straight")
    assert resumed["files"] == straight["files"]
    assert [n for n in straight["shards"] if n.startswith("views-")] == [f"views-k0000-0002-{k:05d}.h5" for k in range(N_IMAGES // SHARD)]
    assert resumed == straight  # byte for byte: the same shards, text and manifest
    a, b = load_targets(killed, index, views=True).views, load_targets(tmp_path / "straight", index, views=True).views
    assert np.array_equal(a.embedding, b.embedding) and np.array_equal(a.params.array, b.params.array)
