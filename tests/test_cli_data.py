"""`vl2v data` through typer's CliRunner: JSON and table output, user errors as one line and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import make_dataset, make_image
from typer.testing import CliRunner

from vl2v.cli import app
from vl2v.data import scan_dataset, split_domain


def run(*args: str):
    return CliRunner().invoke(app, ["data", *args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting `error:` holding the whole message, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert all(line.startswith(("error:", "scan ")) for line in lines), result.stderr  # else: progress only
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def broken_dataset(tmp_path: Path) -> Path:
    root = make_dataset(tmp_path / "toy", domains=("art", "photo"), classes=("cat", "dog"), per_class=5)
    (root / "art" / "cat" / "empty.png").write_bytes(b"")
    (root / "art" / "dog" / "words.jpg").write_text("not an image")
    os.symlink(root / "nowhere.png", root / "photo" / "dog" / "dangling.png")
    (root / "photo" / "dog" / "readme.md").write_text("ignored")
    return root


def test_data_json_counts_splits_and_skips(tmp_path):
    root = broken_dataset(tmp_path)
    result = run(str(root), "--json", "--trial-seed", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    assert summary["name"] == "toy" and summary["domainbed"] is None
    assert summary["classes"] == ["cat", "dog"]
    assert summary["trial_seed"] == 1 and summary["holdout"] == 0.2
    art, photo = summary["domains"]
    assert (art["name"], art["images"], art["classes"]) == ("art", 10, {"cat": 5, "dog": 5})
    assert (photo["name"], photo["images"], photo["classes"]) == ("photo", 10, {"cat": 5, "dog": 5})

    index = scan_dataset(root)
    for d, dom in enumerate(summary["domains"]):
        in_, out = split_domain(index, d, 1)
        assert dom["out_paths"] == [index.files[i].path for i in out]
        assert (dom["in"], dom["out"]) == (len(in_), len(out))
        assert dom["in"] + dom["out"] == dom["images"] == 10  # unreadable candidates in neither part
    assert sorted((s["path"], s["reason"].split(" (")[0]) for s in summary["skipped"]) == [
        ("art/cat/empty.png", "empty file"),
        ("art/dog/words.jpg", "not a readable image"),
        ("photo/dog/dangling.png", "broken symlink"),
    ]
    skipped = {s["path"] for s in summary["skipped"]}
    assert not skipped & {p for dom in summary["domains"] for p in dom["out_paths"]}
    assert {k: n for k, n in summary["ignored"].items() if n} == {"not_image": 1}
    assert summary["missing_classes"] == {}
    assert summary["fingerprint"] == index.fingerprint()

    seed0 = json.loads(run(str(root), "--json").stdout)
    assert seed0["trial_seed"] == 0
    assert seed0["domains"][0]["out_paths"] == [index.files[i].path for i in split_domain(index, 0, 0)[1]]
    assert seed0["domains"][0]["out_paths"] != art["out_paths"]


def test_data_json_holdout_option(tmp_path):
    root = make_dataset(tmp_path / "toy", domains=("a", "b"), classes=("x",), per_class=10)
    summary = json.loads(run(str(root), "--json", "--holdout", "0.5").stdout)
    assert [(d["in"], d["out"]) for d in summary["domains"]] == [(5, 5), (5, 5)]


def test_data_table_shows_domains_counts_and_skips(tmp_path):
    root = broken_dataset(tmp_path)
    make_image(root / "photo" / "extra_class" / "0.png", 3)
    result = run(str(root))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "toy: 3 classes, trial seed 0" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines() if line.startswith("│")}
    # domain -> images, cat, dog, extra_class, in, out
    assert rows["art"] == ["10", "5", "5", "0", "8", "2"]
    assert rows["photo"] == ["11", "5", "5", "1", "9", "2"]
    assert "unreadable file(s)" in text
    for name in ("art/cat/empty.png", "art/dog/words.jpg", "photo/dog/dangling.png"):
        assert name in text
    assert "broken symlink" in text and "empty file" in text
    flat = " ".join(text.split())
    assert "1 not-image file(s) ignored" in flat
    assert "art has no extra_class" in flat


def test_data_unicode_and_spaces(tmp_path):
    root = make_dataset(tmp_path / "jeu de données", domains=("Real World", "Ölgemälde"), classes=("chat noir", "犬"), per_class=5)
    make_image(root / "Ölgemälde" / "犬" / "фото 1.JPG", 9)
    result = run(str(root), "--json", "--trial-seed", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["name"] == "jeu de données"
    assert [d["name"] for d in summary["domains"]] == ["Real World", "Ölgemälde"]
    assert summary["domains"][1]["classes"] == {"chat noir": 5, "犬": 6}
    index = scan_dataset(root)
    for d, dom in enumerate(summary["domains"]):
        assert dom["out_paths"] == [index.files[i].path for i in split_domain(index, d, 1)[1]]
        assert all((root / p).is_file() for p in dom["out_paths"])

    table = run(str(root))
    assert table.exit_code == 0, table.output
    assert "Real World" in table.stdout and "Ölgemälde" in table.stdout and "犬" in table.stdout


def test_data_registry_missing_domain(tmp_path):
    root = make_dataset(tmp_path / "PACS", domains=("art_painting", "cartoon", "photo"), classes=("dog",), per_class=1)
    assert_user_error(run(str(root)), "looks like PACS", "lacks domain folder(s): sketch")


def test_data_strict_names_unreadable_files(tmp_path):
    root = broken_dataset(tmp_path)
    line = assert_user_error(run(str(root), "--strict"), "3 unreadable image(s)", "--strict")
    for name in ("art/cat/empty.png", "art/dog/words.jpg", "photo/dog/dangling.png"):
        assert name in line


def test_data_wrong_path(tmp_path):
    assert_user_error(run(str(tmp_path / "missing")), "error: Dataset folder not found:", "missing")


def test_data_file_instead_of_folder(tmp_path):
    f = tmp_path / "toy.tar"
    f.write_bytes(b"x")
    assert_user_error(run(str(f)), "toy.tar is a file; pass the dataset folder")


def test_data_fewer_than_two_domains(tmp_path):
    root = tmp_path / "one"
    make_image(root / "only" / "cls" / "0.png", 0)
    assert_user_error(run(str(root)), "has 1 domain folder(s) (only)", "at least two")


def test_data_empty_dataset(tmp_path):
    root = tmp_path / "empty"
    for d in ("a", "b"):
        (root / d / "cls").mkdir(parents=True)
    assert_user_error(run(str(root)), "No images found in")


def test_every_command_runs_on_a_fixed_thread_count(dataset, monkeypatch):
    import torch

    monkeypatch.delenv("VL2V_THREADS", raising=False)
    try:
        assert CliRunner().invoke(app, ["--threads", "2", "data", str(dataset)]).exit_code == 0
        assert torch.get_num_threads() == 2
        assert CliRunner().invoke(app, ["data", str(dataset)]).exit_code == 0
        assert torch.get_num_threads() == 1  # the default: not the machine's core count
        monkeypatch.setenv("VL2V_THREADS", "2")
        assert CliRunner().invoke(app, ["data", str(dataset)]).exit_code == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
