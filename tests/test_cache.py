"""The teacher-embedding cache: what it holds, incremental updates, refusals, teacher zero-shot."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import vl2v
from conftest import make_dataset, make_image
from vl2v import cache
from vl2v.cache import Targets, list_shards, load_dataset_targets, load_targets
from vl2v.config import TrainConfig
from vl2v.data import DatasetIndex, ImageFile, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.evaluate import teacher_zero_shot
from vl2v.runtime import UserError
from vl2v.teacher import build_text_embeddings, create_teacher, load_templates
from vl2v.train import train_run

CPU = torch.device("cpu")


def run(index, cache_dir, teacher, **kw):
    return embed_dataset(index, cache_dir, EmbedConfig(teacher=teacher, workers=0, device="cpu", batch_size=8, **kw))


def shard_rows(cache_dir: Path) -> dict[str, tuple]:
    """Every row of every shard, read straight from HDF5: path -> (size, mtime_ns, ok, embedding)."""
    rows = {}
    for shard in sorted(cache_dir.glob("images-*.h5")):
        with h5py.File(shard, "r") as f:
            paths = [p.decode() for p in f["path"][()]]
            for i, p in enumerate(paths):
                assert p not in rows, f"{p} stored twice"
                rows[p] = (int(f["size"][i]), int(f["mtime_ns"][i]), bool(f["ok"][i]), f["embedding"][i])
    return rows


def encode_by_hand(teacher_spec: str, root: Path, paths: list[str]) -> torch.Tensor:
    """The teacher's own preprocessing and encoder on each decoded image, outside the cache code."""
    teacher = create_teacher(teacher_spec, CPU)
    images = torch.stack([teacher.preprocess(Image.open(root / p).convert("RGB")) for p in paths])
    return teacher.encode_images(images)


# --- content --------------------------------------------------------------------------------------


def test_cache_content(dataset, tiny_teacher, tmp_path):
    (dataset / "art" / "dog" / "broken.png").write_bytes(b"not a png")
    index = scan_dataset(dataset)
    assert len(index.files) == 37 and len(index.bad) == 1
    bad = index.bad[0]
    out = tmp_path / "cache"
    report = run(index, out, tiny_teacher, prompts="domains")

    # one row per good image, keyed by its relative path; the unreadable file is not embedded
    rows = shard_rows(out)
    good = [f for f in index.files if f.error is None]
    assert sorted(rows) == sorted(f.path for f in good)
    for f in good:
        assert rows[f.path][:3] == (f.size, f.mtime_ns, True)
        assert rows[f.path][3].dtype == np.float16 and rows[f.path][3].shape == (16,)
    with h5py.File(out / "images-00000.h5", "r") as f:  # each row's content key: its bytes' sha256
        stored = dict(zip((p.decode() for p in f["path"][()]), (h.decode() for h in f["sha256"][()])))
    assert stored == {f.path: hashlib.sha256((dataset / f.path).read_bytes()).hexdigest() for f in good}

    # the embeddings are the teacher's own, computed independently
    targets = load_targets(out, index)
    paths = [f.path for f in good]
    expected = encode_by_hand(tiny_teacher, dataset, paths)
    rows_of = {f.path: i for i, f in enumerate(index.files)}
    got = targets.image[[rows_of[p] for p in paths]]
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    broken = rows_of["art/dog/broken.png"]
    assert targets.valid.tolist() == [i != broken for i in range(37)]
    assert torch.count_nonzero(targets.image[broken]) == 0

    # the same file name in two domains: two different embeddings, both found
    art, photo = rows_of["art/cat/0.png"], rows_of["photo/cat/0.png"]
    assert targets.valid[art] and targets.valid[photo]
    assert not torch.allclose(targets.image[art], targets.image[photo], atol=0.05)
    # training lists files without decoding them: the cache says which one is unreadable
    listed, from_listing = load_dataset_targets(dataset, out)
    assert torch.equal(from_listing.valid, targets.valid)
    assert [(f.path, f.error) for f in listed.bad] == [("art/dog/broken.png", "unreadable (found when embedding)")]
    assert (targets.image[art] - targets.image[photo]).abs().max() > 0.05

    # text.h5: per-template and class embeddings, logit scale
    teacher = create_teacher(tiny_teacher, CPU)
    templates = load_templates("domains")
    per_template, class_emb = build_text_embeddings(teacher, index.classnames, templates)
    with h5py.File(out / "text.h5", "r") as f:
        assert [c.decode() for c in f["classes"][()]] == ["cat", "dog", "sea lion"]
        assert [t.decode() for t in f["templates"][()]] == templates
        assert f["per_template"].shape == (3, 4, 16) and f["per_template"].dtype == np.float32
        np.testing.assert_allclose(f["per_template"][()], per_template.numpy(), atol=1e-6)
        np.testing.assert_allclose(f["class_embedding"][()], class_emb.numpy(), atol=1e-6)
        assert f.attrs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
        assert f.attrs["text_queries"] == 12
    torch.testing.assert_close(targets.text, class_emb, atol=1e-6, rtol=0)
    assert targets.logit_scale == pytest.approx(teacher.logit_scale)
    assert targets.embed_dim == 16

    # manifest: provenance, dataset fingerprint, shard list, queries
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == targets.manifest
    assert manifest["format_version"] == 3 and manifest["vl2v_version"] == vl2v.__version__
    assert manifest["complete"] is True
    assert manifest["provenance"] == {
        "teacher": tiny_teacher,
        "identity": teacher.identity(),
        "open_clip_version": open_clip.__version__,
        "embed_dim": 16,
        "logit_scale": teacher.logit_scale,
        "preprocess": str(teacher.preprocess),
        "random_init": False,
        "templates": templates,
        "prompts": "domains",
        "store_dtype": "fp16",
    }
    assert manifest["dataset"] == {
        "name": "toy",
        "root": str(dataset),
        "fingerprint": index.fingerprint(),
        "domains": ["art", "photo", "sketch"],
        "classes": ["cat", "dog", "sea_lion"],
        "num_files": 37,
        "unreadable": {"art/dog/broken.png": {"size": 9, "mtime_ns": bad.mtime_ns, "sha256": hashlib.sha256(b"not a png").hexdigest()}},
    }
    assert manifest["shards"] == sorted(p.name for p in out.glob("images-*.h5")) == ["images-00000.h5"]
    assert manifest["queries"] == {"images": 36, "texts": 12}
    assert manifest["cost"] == {"image_queries": 36, "view_queries": 0, "text_queries": 12, "from_record": 0, "requests": 6, "retries": 0, "bytes_sent": 0}
    assert manifest["images_with_targets"] == 36 and manifest["subset"] is False
    assert manifest["views"] == {"count": 0, "seed": 0, "queries": 0, "images_with_views": 0, "shards": []}
    # the locks stay (removing a lock file races with its next taker); no temporary file or holder note
    assert sorted(p.name for p in out.glob(".*")) == [".embed-all.lock", ".manifest.lock"]

    # the report says the same
    assert (report.embedded, report.reused, report.failed, report.text_queries) == (36, 0, 1, 12)
    assert report.complete is True and report.cache_dir == out
    assert report.queries_total == {"images": 36, "texts": 12}


def test_fp32_storage(dataset, tiny_teacher, tmp_path):
    index = scan_dataset(dataset)
    run(index, tmp_path / "c16", tiny_teacher)
    run(index, tmp_path / "c32", tiny_teacher, store_dtype="fp32")
    r16, r32 = shard_rows(tmp_path / "c16"), shard_rows(tmp_path / "c32")
    assert {r[3].dtype for r in r32.values()} == {np.dtype(np.float32)}
    for p in r16:
        np.testing.assert_array_equal(r16[p][3], r32[p][3].astype(np.float16))  # fp16 is the rounding of fp32
    assert json.loads((tmp_path / "c32" / "manifest.json").read_text())["provenance"]["store_dtype"] == "fp32"
    t32 = load_targets(tmp_path / "c32", index)
    expected = encode_by_hand(tiny_teacher, dataset, [f.path for f in index.files])
    torch.testing.assert_close(t32.image, expected, atol=1e-5, rtol=0)
    assert t32.image.dtype == torch.float32
    torch.testing.assert_close(t32.image.norm(dim=1), torch.ones(36))


def test_rerun_pays_nothing(dataset, tiny_teacher, tmp_path, monkeypatch):
    index = scan_dataset(dataset)
    out = tmp_path / "cache"
    first = run(index, out, tiny_teacher)
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("images-*.h5")}

    def no_teacher(*a, **k):
        raise AssertionError("a re-run must not build the teacher")

    monkeypatch.setattr("vl2v.embed.create_teacher", no_teacher)
    again = run(index, out, tiny_teacher)
    assert (again.embedded, again.reused, again.text_queries, again.failed) == (0, 36, 0, 0)
    assert again.complete is True
    assert again.queries_total == first.queries_total == {"images": 36, "texts": 3}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("images-*.h5")} == shards
    assert json.loads((out / "manifest.json").read_text())["queries"] == {"images": 36, "texts": 3}


# --- incremental ----------------------------------------------------------------------------------


def test_incremental_update(dataset, tiny_teacher, tmp_path):
    out = tmp_path / "cache"
    run(tmp_index := scan_dataset(dataset), out, tiny_teacher)
    assert len(tmp_index.files) == 36

    for n, path in enumerate(["art/cat/new.png", "photo/dog/new.png", "sketch/sea_lion/new.png"]):
        make_image(dataset / path, 1000 + n)
    changed = dataset / "sketch" / "dog" / "1.png"
    before = changed.stat()
    make_image(changed, 2000, size=20)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    (dataset / "art" / "dog" / "2.png").unlink()
    (dataset / "photo" / "cat" / "3.png").unlink()
    index = scan_dataset(dataset)
    assert len(index.files) == 37

    with pytest.raises(UserError) as e:
        load_targets(out, index)
    msg = str(e.value)
    assert f"does not match {dataset}: 4 file(s) new or changed, 2 removed since it was built." in msg
    assert msg.endswith(f"Update it (only those are embedded): vl2v embed '{dataset}' --teacher '{tiny_teacher}' --cache-dir '{out}'")

    report = run(index, out, tiny_teacher)
    assert (report.embedded, report.reused) == (4, 33)
    assert report.queries_total == {"images": 40, "texts": 3}
    targets = load_targets(out, index)
    assert targets.image.shape == (37, 16) and bool(targets.valid.all())
    assert targets.manifest["dataset"]["fingerprint"] == index.fingerprint()
    expected = encode_by_hand(tiny_teacher, dataset, [f.path for f in index.files])
    torch.testing.assert_close(targets.image, expected, atol=2e-3, rtol=0)
    # the changed file's old row is still on disk, but only the new content is used
    i = [f.path for f in index.files].index("sketch/dog/1.png")
    stored = []
    for shard in sorted(out.glob("images-*.h5")):
        with h5py.File(shard, "r") as f:
            paths = [p.decode() for p in f["path"][()]]
            if "sketch/dog/1.png" in paths:
                stored.append(int(f["mtime_ns"][paths.index("sketch/dog/1.png")]))
    assert stored == [before.st_mtime_ns, index.files[i].mtime_ns]


# --- content identity -----------------------------------------------------------------------------


def no_teacher(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("nothing to embed: the teacher must not be built")

    monkeypatch.setattr("vl2v.embed.create_teacher", refuse)
    monkeypatch.setattr("vl2v.teacher.create_teacher", refuse)


def no_hashing(monkeypatch) -> None:
    def refuse(index, rows, threads=4):
        assert not rows, f"{len(rows)} file(s) hashed: the fast path (size, mtime) should have matched"

    monkeypatch.setattr("vl2v.cache.hash_files", refuse)


def test_a_copied_dataset_with_new_mtimes_pays_nothing_and_trains(dataset, tiny_teacher, tmp_path, monkeypatch, caplog):
    (dataset / "art" / "dog" / "broken.png").write_bytes(b"not a png")  # known unreadable by its bytes
    out = tmp_path / "cache"
    first = run(scan_dataset(dataset), out, tiny_teacher)
    original = load_targets(out, scan_dataset(dataset))
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, copy_function=shutil.copyfile)  # contents only: new mtimes
    for path in copy.rglob("*.png"):
        os.utime(path, ns=(0, (dataset / path.relative_to(copy)).stat().st_mtime_ns + 7_000_000_000))
    no_teacher(monkeypatch)
    assert first.queries_total == {"images": 36, "texts": 3}

    # training lists the copy without decoding: the files whose mtime moved are hashed, and match
    with caplog.at_level(logging.INFO, logger="vl2v.cache"):
        index, targets = load_dataset_targets(copy, out)
    assert torch.equal(targets.image, original.image) and torch.equal(targets.valid, original.valid)
    assert [f.path for f in index.bad] == ["art/dog/broken.png"] and int(targets.valid.sum()) == 36
    assert "Hashed 36 image(s) whose modification time differs from the cache's" in caplog.text
    assert f"36 match by content. `vl2v embed '{copy}'` records their new times" in caplog.text

    # embedding the copy pays nothing and records the new times: no hashing at later starts
    report = run(scan_dataset(copy), out, tiny_teacher)
    assert (report.embedded, report.reused, report.text_queries, report.complete) == (0, 36, 0, True)
    assert report.queries_total == {"images": 36, "texts": 3}
    with h5py.File(out / "images-00001.h5", "r") as f:  # the same embeddings under the copy's times
        assert f.attrs["image_queries"] == 0
        assert dict(zip((p.decode() for p in f["path"][()]), f["mtime_ns"][()].tolist())) == {f.path: f.mtime_ns for f in index.files if f.error is None}
    assert run(scan_dataset(copy), out, tiny_teacher).embedded == 0 and len(list_shards(out)) == 2  # recorded once
    # the original still loads (its unreadable file is hashed: the manifest now has the copy's times)
    assert torch.equal(load_dataset_targets(dataset, out)[1].image, original.image)
    no_hashing(monkeypatch)
    assert torch.equal(load_dataset_targets(copy, out)[1].image, original.image)

    # a renamed dataset folder is the same dataset: relative paths, contents and mtimes unchanged
    renamed = copy.rename(tmp_path / "renamed")
    assert torch.equal(load_dataset_targets(renamed, out)[1].image, original.image)
    cfg = TrainConfig(student="test_vit", pretrained=False, image_size=32, batch_size=4, workers=0, device="cpu", steps=2, checkpoint_freq=2, test_envs=("art",))
    finals = train_run(renamed, out, cfg, tmp_path / "run")  # Align on the renamed copy
    assert list(finals) == ["art"] and (tmp_path / "run" / "env0" / "done.json").exists()


def test_new_times_are_recorded_once_whatever_the_shard_order(dataset, tiny_teacher, tmp_path):
    out = tmp_path / "cache"
    for i in (1, 2):
        run(scan_dataset(dataset), out, tiny_teacher, shard=(i, 2))
    copy = shutil.copytree(dataset, tmp_path / "copy", copy_function=shutil.copyfile)
    for path in copy.rglob("*.png"):
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 7_000_000_000))
    for _ in range(2):  # images-00000.h5 sorts before the parts' shards: the rows with the copy's times win
        report = run(scan_dataset(copy), out, tiny_teacher)
        assert (report.embedded, report.reused, report.complete) == (0, 36, True)
    assert [p.name for p in list_shards(out)] == ["images-00000.h5", "images-p1of2-00000.h5", "images-p2of2-00000.h5"]


def test_changed_bytes_are_re_embedded_even_with_size_and_mtime_restored(dataset, tiny_teacher, tmp_path, caplog):
    victim = make_image(dataset / "art" / "cat" / "x.bmp", 500)  # uncompressed: same size for any content
    out = tmp_path / "cache"
    run(scan_dataset(dataset), out, tiny_teacher)
    row = [f.path for f in scan_dataset(dataset).files].index("art/cat/x.bmp")
    old = load_targets(out, scan_dataset(dataset)).image[row]
    before = victim.stat()
    make_image(victim, 501)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    # a listing alone trusts size and mtime (the cheap path of training); a decoding scan knows better
    assert torch.equal(load_dataset_targets(dataset, out)[1].image[row], old)
    with pytest.raises(UserError, match=r"does not match .*: 1 file\(s\) new or changed, 0 removed"):
        load_targets(out, scan_dataset(dataset))
    report = run(scan_dataset(dataset), out, tiny_teacher)
    assert (report.embedded, report.reused) == (1, 36)
    expected = encode_by_hand(tiny_teacher, dataset, ["art/cat/x.bmp"])[0]
    torch.testing.assert_close(load_targets(out, scan_dataset(dataset)).image[row], expected, atol=2e-3, rtol=0)
    # now two rows share the file's size and mtime: a listing hashes that one file to choose
    with caplog.at_level(logging.INFO, logger="vl2v.cache"):
        listed = load_dataset_targets(dataset, out)[1]
    assert "Hashed 1 image(s)" in caplog.text and "1 match by content" in caplog.text
    torch.testing.assert_close(listed.image[row], expected, atol=2e-3, rtol=0)


def test_equal_files_at_different_paths_are_different_images(dataset, tiny_teacher, tmp_path):
    twin = (dataset / "art" / "cat" / "0.png").read_bytes()
    for path in ("photo/dog/twin.png", "sketch/sea_lion/twin.png"):
        (dataset / path).write_bytes(twin)  # one content under two labels
    out = tmp_path / "cache"
    index = scan_dataset(dataset)
    assert run(index, out, tiny_teacher).embedded == 38
    rows = shard_rows(out)
    assert {"art/cat/0.png", "photo/dog/twin.png", "sketch/sea_lion/twin.png"} <= rows.keys() and len(rows) == 38
    targets = load_targets(out, index)
    at = {f.path: i for i, f in enumerate(index.files)}
    twins = [at["art/cat/0.png"], at["photo/dog/twin.png"], at["sketch/sea_lion/twin.png"]]
    assert targets.valid[twins].all() and [index.files[i].label for i in twins] == [0, 1, 2]
    assert torch.equal(targets.image[twins[0]], targets.image[twins[1]])
    # the key is path and content: known content at a new path is a new image
    (dataset / "art" / "dog" / "twin.png").write_bytes(twin)
    assert run(scan_dataset(dataset), out, tiny_teacher).embedded == 1


def test_a_version_1_cache_still_loads_and_is_brought_up_to_date(dataset, tiny_teacher, tmp_path):
    out = tmp_path / "cache"
    index = scan_dataset(dataset)
    run(index, out, tiny_teacher)
    expected = load_targets(out, index).image
    # what vl2v wrote before content keys: no sha256 column, a fingerprint over path, size and mtime
    with h5py.File(out / "images-00000.h5", "a") as f:
        del f["sha256"]
    legacy = hashlib.sha256("".join(f"{f.path}\t{f.size}\t{f.mtime_ns}\n" for f in index.files).encode()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["dataset"]["fingerprint"] = legacy
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(load_dataset_targets(dataset, out)[1].image, expected)

    # its rows match by size and mtime only: a touched file is new to it, and embed brings it up to date
    touched = dataset / "photo" / "dog" / "2.png"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(UserError, match=r"does not match .*: 1 file\(s\) new or changed, 0 removed"):
        load_dataset_targets(dataset, out)
    report = run(scan_dataset(dataset), out, tiny_teacher)
    assert (report.embedded, report.reused) == (1, 35)
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 3
    torch.testing.assert_close(load_dataset_targets(dataset, out)[1].image, expected, atol=2e-3, rtol=0)


# --- refusals -------------------------------------------------------------------------------------


def test_no_cache(dataset, tmp_path):
    index = scan_dataset(dataset)
    with pytest.raises(UserError, match=r"^No teacher cache at .*nocache\. Build it with: vl2v embed '.*toy' --teacher 'X:y'$"):
        load_targets(tmp_path / "nocache", index, teacher="X:y")


def test_cache_for_other_classes(dataset, tiny_teacher, tmp_path):
    out = tmp_path / "cache"
    run(scan_dataset(dataset), out, tiny_teacher)
    other = scan_dataset(make_dataset(tmp_path / "other", classes=("cat", "dog", "horse"), per_class=1))
    with pytest.raises(UserError) as e:
        load_targets(out, other)
    assert str(e.value).startswith(f"Cache {out} was built for other classes than {other.root} ('sea_lion' vs 'horse')")
    assert str(e.value).endswith(f"vl2v embed '{other.root}' --cache-dir NEW_FOLDER")


def test_cache_of_another_teacher(dataset, tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    index = scan_dataset(dataset)
    run(index, out, tiny_teacher)
    with pytest.raises(UserError) as e:
        load_targets(out, index, teacher="ViT-B-32:openai")
    assert str(e.value) == (
        f"Cache {out} was built with teacher {tiny_teacher}, not ViT-B-32:openai. "
        f"Run: vl2v embed '{dataset}' --teacher 'ViT-B-32:openai' --cache-dir '{out}'"
    )
    # the same teacher, spelled with relative paths, is the same teacher
    monkeypatch.chdir(tmp_path)
    assert load_targets(out, index, teacher="tiny-clip.json:tiny-clip.pt").image.shape == (36, 16)
    assert load_targets(out, index, teacher=tiny_teacher).image.shape == (36, 16)

    # embedding another teacher into that folder is refused before anything is computed
    (tmp_path / "other-clip.json").write_text((tmp_path / "tiny-clip.json").read_text())
    with pytest.raises(UserError, match=r"holds embeddings of teacher .*tiny-clip\.pt, not .*other-clip\.json\. Pass another --cache-dir"):
        run(index, out, str(tmp_path / "other-clip.json"))


def test_corrupt_manifest(dataset, tiny_teacher, tmp_path):
    out = tmp_path / "cache"
    index = scan_dataset(dataset)
    run(index, out, tiny_teacher)
    pattern = rf"^Corrupt cache manifest {out}/manifest\.json: .*Delete it and re-run `vl2v embed`\.$"
    for text in ["{not json", "", '{"complete": true}', "[]", "\udcff"]:
        (out / "manifest.json").write_text(text, errors="surrogateescape")
        with pytest.raises(UserError, match=pattern):
            load_targets(out, index)
        with pytest.raises(UserError, match=pattern):
            run(index, out, tiny_teacher)
    # the shards are the truth: without the manifest, a re-run embeds nothing and restores it
    (out / "manifest.json").unlink()
    report = run(index, out, tiny_teacher)
    assert (report.embedded, report.reused, report.complete) == (0, 36, True)
    assert load_targets(out, index).valid.all()


# --- low-level helpers ----------------------------------------------------------------------------


def test_shard_names(tmp_path):
    assert cache.shard_name(3) == "images-00003.h5"
    assert cache.shard_name(12, (2, 4)) == "images-p2of4-00012.h5"
    for name in ["images-00000.h5", "images-00001.h5", "images-p2of4-00000.h5", "images-p2of4-00007.h5", "images-x.h5", ".images-00002.h5.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in cache.list_shards(tmp_path)] == [
        "images-00000.h5", "images-00001.h5", "images-p2of4-00000.h5", "images-p2of4-00007.h5",
    ]
    assert cache.next_shard_number(tmp_path, (1, 1)) == 2
    assert cache.next_shard_number(tmp_path, (2, 4)) == 8
    assert cache.next_shard_number(tmp_path, (3, 4)) == 0
    assert cache.default_cache_dir(Path("c"), "PACS", "ViT-B-16-quickgelu-openai") == Path("c/PACS/ViT-B-16-quickgelu-openai")


# --- teacher zero-shot ----------------------------------------------------------------------------


def test_teacher_zero_shot_by_hand():
    e = torch.eye(3)
    files = [
        # domain 0: 3 usable images, 2 right; one invalid (would be right if counted: class 0 == argmax of zeros)
        ImageFile("a/0/x.png", 0, 0, 1, 1),  # -> class 0, right
        ImageFile("a/1/x.png", 0, 1, 1, 1),  # -> class 2, wrong
        ImageFile("a/2/x.png", 0, 2, 1, 1),  # -> class 2, right
        ImageFile("a/0/bad.png", 0, 0, 1, 1),  # invalid
        # domain 1: 1 of 2
        ImageFile("b/1/x.png", 1, 1, 1, 1),  # -> class 1, right
        ImageFile("b/2/x.png", 1, 2, 1, 1),  # -> class 0, wrong
        # domain 2: nothing usable
        ImageFile("c/0/x.png", 2, 0, 1, 1),
    ]
    index = DatasetIndex(Path("/toy"), "toy", ["a", "b", "c"], ["0", "1", "2"], files)
    image = torch.stack([e[0], 0.6 * e[1] + 0.8 * e[2], e[2], torch.zeros(3), e[1], 0.8 * e[0] + 0.6 * e[2], e[0]])
    valid = torch.tensor([True, True, True, False, True, True, False])
    targets = Targets(image, valid, e.clone(), 100.0, {})
    acc = teacher_zero_shot(targets, index)
    assert list(acc) == ["a", "b", "c"]
    assert acc["a"] == pytest.approx(2 / 3) and acc["b"] == pytest.approx(1 / 2)
    assert np.isnan(acc["c"])
    splits = {"first": np.array([0, 1]), "right": np.array([0, 2, 4]), "none": np.array([], dtype=np.int64)}
    by_split = teacher_zero_shot(targets, index, splits)
    assert by_split["first"] == pytest.approx(0.5) and by_split["right"] == 1.0 and np.isnan(by_split["none"])
