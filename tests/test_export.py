"""Deployment: `--test-env none` runs through the CLI, `vl2v export` bundles (ONNX, TorchScript, int8)
checked against the eager student, `vl2v predict` and `vl2v eval BUNDLE`, bad runs, bundles and images."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import make_cached_toy, make_dataset, make_image
from test_cli_train import assert_user_error, invoke

from vl2v import runs
from vl2v.bundle import BUNDLE_FILE, load_bundle
from vl2v.data import build_eval_transform, load_rgb, scan_dataset
from vl2v.evaluate import _eval_images, load_student, predict_logits
from vl2v.student import LinearHead, TextHead

TINY = ["--no-pretrained", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--steps", "2", "--checkpoint-freq", "1"]
RUNS = {"vit-distill": TextHead, "vit-erm": LinearHead, "resnet-align": TextHead}  # run -> its student's head
FORMATS = ("onnx", "torchscript")
CPU = torch.device("cpu")


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def ok_json(*args: str):
    return json.loads(ok(*args, "--json").stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Deployment runs made through the CLI (tables printed, not JSON): Align → Distill and ERM of a
    test_vit with `vl2v run`, Align of a test_resnet; and a held-out-domain ERM run without SWAD."""
    tmp = tmp_path_factory.mktemp("export")
    root, cache = make_cached_toy(tmp, per_class=4)
    teacher = f"{tmp / 'tiny-clip.json'}:{tmp / 'tiny-clip.pt'}"
    experiment = tmp / "vit"
    ok("run", root, "--student", "test_vit", *TINY, "--methods", "adip,erm", "--test-env", "none", "--cache-dir", cache,
       "--teacher", teacher, "--run-dir", experiment)
    ok("align", root, "--student", "test_resnet", *TINY, "--test-env", "none", "--cache-dir", cache, "--run-dir", tmp / "resnet")
    ok("train", root, "--method", "erm", "--student", "test_resnet", *TINY, "--test-env", "art", "--no-swad", "--run-dir", tmp / "held_out")
    paths = {"vit-distill": experiment / "trial0" / "distill", "vit-erm": experiment / "trial0" / "erm", "resnet-align": tmp / "resnet"}
    return SimpleNamespace(tmp=tmp, root=root, runs=paths, held_out=tmp / "held_out")


@pytest.fixture(scope="module")
def bundles(trained):
    """Every deployment run exported in both formats: {(run, format): bundle folder}."""
    out = {}
    for name, run in trained.runs.items():
        for fmt in FORMATS:
            out[name, fmt] = trained.tmp / "bundles" / f"{name}-{fmt}"
            ok("export", run, "--format", fmt, "--out", out[name, fmt])
    return out


def eager(run: Path, model: str = "swad"):
    student, data_cfg = load_student(runs.run_info(run), run / "all" / f"{model}.pt", CPU)
    return student.eval(), data_cfg


def dataset_images(root: Path, n: int = 5) -> list[Path]:
    return sorted(root.rglob("*.png"))[:: 36 // n][:n]


# --- deployment runs through the CLI --------------------------------------------------------------


def test_deployment_runs_train_every_domain_into_one_folder(trained):
    for name, run in trained.runs.items():
        assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["all"], name
        assert {"best.pt", "swad.pt", "done.json"} <= {p.name for p in (run / "all").iterdir()}
        assert runs.run_info(run)["config"]["test_envs"] == ["none"]
    assert runs.run_info(trained.runs["vit-distill"])["from_run"] == str(trained.runs["vit-distill"].with_name("align").resolve())
    rows = ok_json("eval", trained.runs["vit-distill"], "--workers", "0")
    assert [(r["held_out"], r["model"]) for r in rows] == [("none", "best"), ("none", "swad")]
    assert all(set(r["accuracy"]) == {"art", "photo", "sketch"} for r in rows)


def test_a_run_with_held_out_domains_and_a_deployment_model(trained, tmp_path):
    run = shutil.copytree(trained.held_out, tmp_path / "run")
    ok("train", trained.root, "--method", "erm", "--student", "test_resnet", *TINY, "--test-env", "none", "--no-swad", "--run-dir", run)
    rows = ok_json("eval", run, "--workers", "0")
    assert [(r["held_out"], r["model"]) for r in rows] == [("none", "best"), ("art", "best")]
    assert ok_json("export", run, "--format", "torchscript", "--out", tmp_path / "b")["provenance"]["held_out"] == "none"
    assert ok_json("export", run, "--env", "art", "--format", "torchscript", "--out", tmp_path / "b")["provenance"]["held_out"] == "art"


# --- export ---------------------------------------------------------------------------------------


def test_bundle_json_describes_model_preprocessing_and_provenance(trained, bundles):
    run = trained.runs["vit-distill"]
    info = json.loads((bundles["vit-distill", "onnx"] / BUNDLE_FILE).read_text())
    assert sorted(p.name for p in bundles["vit-distill", "onnx"].iterdir()) == ["bundle.json", "model.onnx"]
    assert info["format"] == "onnx" and info["quantize"] is None and info["exporter"]["opset"] == 17
    assert info["classes"] == ["cat", "dog", "sea_lion"]
    assert info["preprocessing"] == {"input_size": 32, "resize": {"size": [32, 32], "interpolation": "bilinear", "crop": None},
                                     "scale": "1/255", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW RGB float32"}
    assert info["outputs"] == {"logits": ["batch", 3], "embedding": ["batch", 16]}
    p = info["provenance"]
    assert (p["run"], p["held_out"], p["model"], p["method"], p["student"]) == (str(run.resolve()), "none", "swad", "distill", "test_vit")
    assert p["teacher"] == runs.run_info(run)["teacher"] and p["dataset"]["domains"] == ["art", "photo", "sketch"]
    done = runs.read_final(run / "all")
    assert p["recorded"] == {k: done["SWAD"][k] for k in ("step", "tr_outacc", "tr_outloss", "test_in_acc", "test_acc")}
    assert info["check"]["max_abs_diff_logits"] <= 1e-4 and info["check"]["top1_agreement"] == 1.0
    erm = json.loads((bundles["vit-erm", "torchscript"] / BUNDLE_FILE).read_text())
    assert erm["provenance"]["teacher"] is None and erm["model_file"] == "model.torchscript.pt"


def test_best_model_records_the_checkpoint_best_pt_was_saved_at(trained, tmp_path):
    bundle = ok_json("export", trained.held_out, "--env", "art", "--format", "onnx", "--out", tmp_path / "b")
    assert bundle["provenance"]["model"] == "best" and bundle["provenance"]["held_out"] == "art"  # --no-swad: best by default
    checkpoints = [r for r in runs.read_records(trained.held_out / "env0") if r["kind"] == "checkpoint"]
    recorded = bundle["provenance"]["recorded"]
    assert recorded["step"] == checkpoints[-1]["step"]  # model_save 100 > the last step: best.pt is the last checkpoint
    assert recorded["domains"]["art"] == {"in": checkpoints[-1]["env0_in_acc"], "out": checkpoints[-1]["env0_out_acc"]}
    assert recorded["test_acc"] == checkpoints[-1]["test_acc"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", RUNS)
def test_exported_logits_and_embedding_equal_the_eager_students(trained, bundles, name, fmt):
    student, data_cfg = eager(trained.runs[name])
    assert isinstance(student.head, RUNS[name])
    bundle = load_bundle(bundles[name, fmt], device="cpu")
    real = np.stack([bundle.preprocessing(load_rgb(p)) for p in dataset_images(trained.root)])
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    for images in (real, noise):  # batch sizes 5 and 4: neither is the traced one
        logits, embedding = bundle(images)
        with torch.no_grad():
            x = torch.from_numpy(images)
            expected_logits, expected_embedding = student(x).numpy(), student.encode(x).numpy()
        assert logits.shape == (len(images), 3) and embedding.shape == expected_embedding.shape
        assert np.abs(logits - expected_logits).max() <= 1e-4
        assert np.abs(embedding - expected_embedding).max() <= 1e-4
        assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_bundle_preprocessing_is_the_eval_transform(trained, bundles):
    bundle = load_bundle(bundles["resnet-align", "onnx"], device="cpu")
    transform = build_eval_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    wide = trained.tmp / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 57, 3), dtype=np.uint8)).save(wide)
    for path in [*dataset_images(trained.root, 2), wide]:
        image = load_rgb(path)
        assert np.array_equal(bundle.preprocessing(image), transform(image).numpy())


def test_int8_bundle_is_smaller_and_evaluated_like_any_bundle(trained, bundles, tmp_path):
    run = trained.runs["vit-distill"]
    out = tmp_path / "int8"
    info = ok_json("export", run, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert info["quantize"] == "int8" and info["exporter"]["quantized_ops"] == ["MatMul", "Gemm"]
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx"]
    assert (out / "model.onnx").stat().st_size < 0.6 * (bundles["vit-distill", "onnx"] / "model.onnx").stat().st_size
    assert 0.0 < info["check"]["max_abs_diff_logits"] < 1.0  # quantised: close, not equal
    fp32, int8 = ok_json("eval", bundles["vit-distill", "onnx"], "--workers", "0"), ok_json("eval", out, "--workers", "0")
    assert [r["model"] for r in fp32 + int8] == ["swad (onnx)", "swad (onnx int8)"]
    assert set(int8[0]["accuracy"]) == {"art", "photo", "sketch"} and all(0.0 <= a <= 1.0 for a in int8[0]["accuracy"].values())
    probabilities = ok_json("predict", out, trained.root / "art" / "cat", "--workers", "0")["predictions"][0]["top_k"]
    assert sum(p["probability"] for p in probabilities) == pytest.approx(1.0, abs=1e-5)


def test_export_replaces_a_bundle_whole_and_a_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    import vl2v.export
    from vl2v.runtime import UserError

    out = tmp_path / "b"
    ok("export", trained.runs["resnet-align"], "--format", "torchscript", "--out", out)
    ok("export", trained.runs["resnet-align"], "--format", "onnx", "--model", "best", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx"]
    assert json.loads((out / BUNDLE_FILE).read_text())["provenance"]["model"] == "best"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_check(*args, **kwargs):
        raise UserError("the check failed")

    monkeypatch.setattr(vl2v.export, "check_bundle", broken_check)
    assert_user_error(invoke("export", trained.runs["resnet-align"], "--format", "torchscript", "--out", out), "the check failed")
    assert_user_error(invoke("export", trained.runs["resnet-align"], "--format", "onnx", "--out", tmp_path / "new"), "the check failed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no new bundle, no temporary folder


# --- predict --------------------------------------------------------------------------------------


def test_predict_top1_is_what_eval_predicts_and_its_accuracy(trained, bundles):
    run, root = trained.runs["vit-distill"], trained.root
    result = ok_json("predict", bundles["vit-distill", "onnx"], root, "--top-k", "2", "--workers", "0", "--batch-size", "7")
    assert result["skipped"] == [] and len(result["predictions"]) == 36
    top1 = {Path(p["path"]).relative_to(root).as_posix(): p["top_k"][0]["class"] for p in result["predictions"]}
    assert all(len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] for p in result["predictions"])
    index = scan_dataset(root)
    student, data_cfg = eager(run)
    images, good = _eval_images(index, data_cfg, 64, 0)
    predicted = predict_logits(student, images, CPU).argmax(1)
    assert [top1[index.files[i].path] for i in good] == [index.classes[c] for c in predicted]
    # the accuracy of predict's top-1 per domain is `vl2v eval`'s, of the run's model and of the bundle
    accuracy = {d: np.mean([top1[f.path] == index.classes[f.label] for f in index.files if f.domain == i]) for i, d in enumerate(index.domains)}
    run_rows = {r["model"]: r["accuracy"] for r in ok_json("eval", run, "--workers", "0")}
    assert run_rows["swad"] == pytest.approx(accuracy)
    assert ok_json("eval", bundles["vit-distill", "torchscript"], "--data", root, "--workers", "0")[0]["accuracy"] == pytest.approx(accuracy)


def test_predict_csv_table_and_the_same_answers_from_both_formats(trained, bundles):
    folder = trained.root / "photo"
    rows = list(csv.reader(io.StringIO(ok("predict", bundles["vit-erm", "torchscript"], folder, "--csv", "--top-k", "9", "--workers", "0").stdout)))
    assert rows[0] == ["path", "rank", "class", "probability"]
    assert len(rows) == 1 + 12 * 3 and [r[1] for r in rows[1:4]] == ["1", "2", "3"]  # --top-k above the class count: every class
    assert all(abs(sum(float(r[3]) for r in rows[i : i + 3]) - 1) < 1e-4 for i in range(1, len(rows), 3))
    onnx = ok_json("predict", bundles["vit-erm", "onnx"], folder, "--workers", "0")["predictions"]
    ts = ok_json("predict", bundles["vit-erm", "torchscript"], folder, "--workers", "0")["predictions"]
    assert [p["top_k"][0]["class"] for p in onnx] == [p["top_k"][0]["class"] for p in ts]
    table = ok("predict", bundles["vit-erm", "onnx"], folder / "cat" / "0.png", "--top-k", "1").stdout
    assert "predictions (probability %)" in table and onnx[0]["top_k"][0]["class"] in table


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bundle_works_after_its_run_folder_is_deleted(trained, tmp_path, fmt):
    run = shutil.copytree(trained.runs["resnet-align"], tmp_path / "run")
    bundle = tmp_path / "bundle"
    ok("export", run, "--format", fmt, "--out", bundle)
    before = ok_json("predict", bundle, trained.root / "sketch", "--workers", "0")
    evaluated = ok_json("eval", bundle, "--workers", "0")
    shutil.rmtree(run)
    assert ok_json("predict", bundle, trained.root / "sketch", "--workers", "0") == before
    assert ok_json("eval", bundle, "--workers", "0") == evaluated  # by default on the data it was trained on


def test_unreadable_images_are_reported_and_skipped(trained, bundles, tmp_path):
    folder = make_dataset(tmp_path / "imgs", domains=("a",), classes=("x",), per_class=2)
    (folder / "a" / "x" / "broken.jpg").write_bytes(b"not an image")
    (folder / "a" / "x" / "empty.png").write_bytes(b"")
    make_image(folder / "a" / ".hidden" / "h.png", 1)
    (folder / "notes.txt").write_text("ignored")
    result = invoke("predict", bundles["resnet-align", "onnx"], folder, "--json", "--workers", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sorted(Path(p["path"]).name for p in out["predictions"]) == ["0.png", "1.png"]
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert sorted(reasons) == ["broken.jpg", "empty.png"] and reasons["empty.png"] == "empty file"
    assert reasons["broken.jpg"].startswith("not a readable image (cannot identify image file")
    assert f"skipped {folder / 'a' / 'x' / 'broken.jpg'}: not a readable image" in result.stderr
    assert_user_error(invoke("predict", bundles["resnet-align", "onnx"], folder / "a" / "x" / "broken.jpg"),
                      "None of the 1 image(s) could be read", "broken.jpg: not a readable image")


def test_predict_and_eval_of_a_bundle_import_no_training_code(trained, bundles):
    """The bundle runtime is onnxruntime / torch.jit: no timm, open_clip or training modules."""
    bundle = bundles["vit-distill", "onnx"]
    script = textwrap.dedent(f"""
        import json, sys
        from typer.testing import CliRunner
        from vl2v.cli import app
        for args in (["predict", {str(bundle)!r}, {str(trained.root / 'art')!r}, "--json"], ["eval", {str(bundle)!r}, "--json"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0, r.output
        loaded = [m for m in sys.modules if m.split(".")[0] in ("timm", "open_clip")
                  or m in ("vl2v.student", "vl2v.train", "vl2v.export", "vl2v.teacher", "vl2v.embed", "vl2v.pipeline")]
        print(json.dumps(loaded))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


# --- bad input ------------------------------------------------------------------------------------


def copy_bundle(bundles, tmp_path: Path, key=("resnet-align", "onnx")) -> Path:
    return Path(shutil.copytree(bundles[key], tmp_path / "bundle"))


def edit_bundle_json(bundle: Path, **changes) -> None:
    info = json.loads((bundle / BUNDLE_FILE).read_text())
    info.update(changes)
    (bundle / BUNDLE_FILE).write_text(json.dumps(info))


def test_export_refuses_runs_without_a_finished_model(trained, tmp_path):
    out = tmp_path / "b"
    unfinished = shutil.copytree(trained.runs["resnet-align"], tmp_path / "run")
    (unfinished / "all" / "done.json").unlink()
    assert_user_error(invoke("export", unfinished, "--format", "onnx", "--out", out),
                      f"{unfinished} has no finished model for --env none", "done.json is missing", "finish it")
    assert_user_error(invoke("export", tmp_path, "--format", "onnx", "--out", out), f"{tmp_path} is not a vl2v run directory")
    held_out = trained.held_out
    assert_user_error(invoke("export", held_out, "--format", "onnx", "--out", out),
                      f"{held_out} has no deployment model (--test-env none): pass --env, one of: art.")
    assert_user_error(invoke("export", held_out, "--env", "arts", "--format", "onnx", "--out", out), "Unknown --env 'arts'.", "Did you mean 'art'?")
    assert_user_error(invoke("export", held_out, "--env", "photo", "--format", "onnx", "--out", out), "no finished model for --env photo")
    assert_user_error(invoke("export", held_out, "--env", "art", "--model", "swad", "--format", "onnx", "--out", out), "has no swad.pt", "--model best")
    assert_user_error(invoke("export", held_out, "--env", "art", "--model", "last", "--format", "onnx", "--out", out), "Unknown --model 'last'")
    assert not out.exists()


def test_export_refuses_bad_flags_and_a_folder_that_is_not_a_bundle(trained, tmp_path):
    run = trained.runs["resnet-align"]
    out = tmp_path / "b"
    assert_user_error(invoke("export", run, "--format", "onx", "--out", out), "Unknown --format 'onx'.", "Did you mean 'onnx'?")
    assert_user_error(invoke("export", run, "--format", "torchscript", "--quantize", "int8", "--out", out), "--quantize int8 is for --format onnx")
    assert_user_error(invoke("export", run, "--format", "onnx", "--quantize", "int4", "--out", out), "Unknown --quantize 'int4'", "int8")
    assert not out.exists()
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_user_error(invoke("export", run, "--format", "onnx", "--out", out), f"--out {out} exists and is not a vl2v bundle")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_bad_bundles_get_one_line_each(bundles, tmp_path, trained):
    image = trained.root / "art" / "cat" / "0.png"
    assert_user_error(invoke("predict", tmp_path, image), f"{tmp_path} is not a vl2v bundle (no bundle.json)", "vl2v export")
    bundle = copy_bundle(bundles, tmp_path)
    (bundle / "model.onnx").unlink()
    assert_user_error(invoke("predict", bundle, image), f"{bundle / 'model.onnx'} is missing from the bundle")
    shutil.rmtree(bundle)

    bundle = copy_bundle(bundles, tmp_path)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    assert_user_error(invoke("predict", bundle, image), "does not match the sha256", "corrupt or replaced")
    (bundle / "model.onnx").write_bytes(b"garbage")
    edit_bundle_json(bundle, sha256=__import__("hashlib").sha256(b"garbage").hexdigest())
    assert_user_error(invoke("predict", bundle, image), f"Cannot load {bundle / 'model.onnx'}", "Export the bundle again")
    assert_user_error(invoke("eval", bundle), f"Cannot load {bundle / 'model.onnx'}")


@pytest.mark.parametrize("change, message", [
    ({"classes": ["cat", "dog"]}, "gives logits of shape [1, 3]; {json} lists 2 classes"),
    ({"format": "tflite"}, "{json} is not a valid bundle description: unknown format 'tflite'"),
    ({"classes": None}, "'classes' must be a non-empty list of names"),
    ({"bundle_version": 9}, "bundle version 9; this vl2v reads version 1 (upgrade vl2v)"),
    ({"preprocessing": {"input_size": 32}}, "bad 'preprocessing' (KeyError: 'resize')"),
    ({"model_file": "../x.onnx"}, "model_file '../x.onnx' (onnx bundles name it 'model.onnx')"),
])
def test_a_wrong_bundle_json_is_refused(bundles, tmp_path, trained, change, message):
    bundle = copy_bundle(bundles, tmp_path)
    edit_bundle_json(bundle, **change)
    assert_user_error(invoke("predict", bundle, trained.root / "art" / "cat" / "0.png"), message.format(json=bundle / BUNDLE_FILE))


def test_a_bundle_json_that_is_not_json_or_misses_keys(bundles, tmp_path, trained):
    bundle = copy_bundle(bundles, tmp_path)
    (bundle / BUNDLE_FILE).write_text("{ nope")
    assert_user_error(invoke("predict", bundle, trained.root), f"{bundle / BUNDLE_FILE} is not a valid bundle description: not JSON")
    (bundle / BUNDLE_FILE).write_text(json.dumps({"format": "onnx"}))
    assert_user_error(invoke("eval", bundle), "is not a valid bundle description: no 'bundle_version', 'model_file', 'sha256', 'classes'")


def test_bad_predict_and_eval_arguments(bundles, trained, tmp_path):
    bundle = bundles["resnet-align", "onnx"]
    assert_user_error(invoke("predict", bundle, tmp_path / "nope.png"), f"{tmp_path / 'nope.png'} not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("predict", bundle, tmp_path / "empty"), f"No images in {tmp_path / 'empty'}")
    image = trained.root / "art" / "cat" / "0.png"
    assert_user_error(invoke("predict", bundle, image, "--top-k", "0"), "--top-k must be ≥ 1, not 0")
    assert_user_error(invoke("predict", bundle, image, "--batch-size", "0"), "--batch-size must be ≥ 1, not 0")
    assert_user_error(invoke("predict", bundle, image, "--json", "--csv"), "--json and --csv both print on stdout")
    other = make_dataset(tmp_path / "other", classes=("cow", "horse"), per_class=1)
    assert_user_error(invoke("eval", bundle, "--data", other), f"{other} has classes ['cow', 'horse']", "the bundle predicts ['cat', 'dog', 'sea_lion']")
    assert_user_error(invoke("eval", bundle, "--teacher"), "is a bundle: --teacher reads a teacher cache")
    moved = copy_bundle(bundles, tmp_path)
    info = json.loads((moved / BUNDLE_FILE).read_text())
    info["provenance"]["dataset"]["root"] = str(tmp_path / "gone")
    (moved / BUNDLE_FILE).write_text(json.dumps(info))
    assert_user_error(invoke("eval", moved), f"The bundle's training data {tmp_path / 'gone'} is gone; pass --data DIR")
