"""`vl2v run / results / eval / align / distill` through typer's CliRunner: the pipeline end to end, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_CLIP, make_dataset
from typer.testing import CliRunner

import vl2v.embed
from vl2v import runs
from vl2v.cache import load_targets
from vl2v.cli import app
from vl2v.data import scan_dataset
from vl2v.selection import start_checkpoint

DOMAINS = ["art", "photo", "sketch"]
SELECTIONS = ["training-domain validation", "SWAD"]
METHODS = ["align", "distill", "erm", "kd"]
TINY = ["--student", "test_vit", "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--workers", "0"]


def invoke(*args: str):
    """Run the CLI and put the root logger back (its callback reconfigures logging)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def ok_json(*args: str):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one `error:` line holding the message, no traceback, nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`vl2v run` with 2 trials on a toy dataset, the teacher cache under $VL2V_CACHE in tmp."""
    tmp = tmp_path_factory.mktemp("cli_train")
    root = make_dataset(tmp / "toy")
    config = tmp / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    open_clip.add_model_config(config)
    weights = tmp / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), weights)
    runs_root = tmp / "runs"
    embed_configs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VL2V_CACHE", str(tmp / "cache"))
        real_embed = vl2v.embed.embed_all_parts
        mp.setattr(vl2v.embed, "embed_all_parts", lambda index, cache_dir, cfg, **kw: embed_configs.append(cfg) or real_embed(index, cache_dir, cfg, **kw))
        rows = ok_json("run", root, *TINY, "--steps", "3", "--checkpoint-freq", "2", "--teacher", f"{config}:{weights}", "--trials", "2",
                       "--methods", "adip,erm,kd", "--run-dir", runs_root / "toy" / "test_vit")
    caches = [p.parent for p in (tmp / "cache").rglob("manifest.json")]
    assert len(caches) == 1 and caches[0].parent == tmp / "cache" / "toy"
    assert [c.workers for c in embed_configs] == [0]  # --workers 0 holds for the teacher pass too
    return tmp, root, runs_root, caches[0], rows


def run_dir(runs_root: Path, trial: int, method: str) -> Path:
    return runs_root / "toy" / "test_vit" / f"trial{trial}" / method


def test_run_trains_every_method_for_every_trial_and_domain(pipeline_run):
    tmp, root, runs_root, cache, rows = pipeline_run
    for trial in (0, 1):
        for method in METHODS:
            path = run_dir(runs_root, trial, method)
            info = runs.run_info(path)
            assert info["config"]["method"] == method and info["config"]["trial_seed"] == trial
            assert info["config"]["steps"] == 3 and info["config"]["student"] == "test_vit" and info["config"]["pretrained"] is False
            assert info["cache_dir"] == (None if method == "erm" else str(cache.resolve()))  # ERM needs no teacher
            for env in range(3):
                done = json.loads((runs.env_dir(path, env) / "done.json").read_text())
                assert set(done) == set(SELECTIONS)
        assert runs.run_info(run_dir(runs_root, trial, "distill"))["from_run"] == str(run_dir(runs_root, trial, "align").resolve())
    # another trial seed: other in/out splits, so another run
    a0 = runs.read_records(runs.env_dir(run_dir(runs_root, 0, "align"), 0))
    a1 = runs.read_records(runs.env_dir(run_dir(runs_root, 1, "align"), 0))
    assert [r.get("loss") for r in a0] != [r.get("loss") for r in a1]
    assert rows[0]["method"] == "teacher zero-shot" and rows[1:] == ok_json("results", runs_root)  # the rows of `results`


def test_results_json_has_mean_and_std_over_two_trials(pipeline_run):
    tmp, root, runs_root, cache, _ = pipeline_run
    rows = ok_json("results", runs_root)
    assert [(r["method"], r["selection"]) for r in rows] == [(m, sel) for m in METHODS for sel in SELECTIONS]
    for row in rows:
        assert row["dataset"] == "toy" and row["student"] == "test_vit" and row["domain_order"] == DOMAINS
        assert set(row["domains"]) == set(DOMAINS)
        for env, domain in enumerate(DOMAINS):
            cell = row["domains"][domain]
            accs = [json.loads((runs.env_dir(run_dir(runs_root, t, row["method"]), env) / "done.json").read_text())[row["selection"]]["test_in_acc"] for t in (0, 1)]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(100 * np.mean(accs)) and cell["std"] == pytest.approx(100 * np.std(accs))
        assert row["avg"] == pytest.approx(np.mean([row["domains"][d]["mean"] for d in DOMAINS]))

    result = invoke("results", runs_root, "--markdown")
    assert result.exit_code == 0, result.output
    assert "### toy" in result.stdout
    assert "| student | method | selection | art | photo | sketch | avg |" in result.stdout
    assert result.stdout.count("| test_vit | ") == 8 and " ± " in result.stdout


def test_eval_a_run_reproduces_its_recorded_accuracies(pipeline_run):
    tmp, root, runs_root, cache, _ = pipeline_run
    path = run_dir(runs_root, 0, "distill")
    rows = ok_json("eval", path, "--workers", "0")
    assert [(r["held_out"], r["model"]) for r in rows] == [(d, m) for d in DOMAINS for m in ("best", "swad")]
    for row in rows:
        assert set(row["accuracy"]) == set(DOMAINS) and all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        env_path = runs.env_dir(path, DOMAINS.index(row["held_out"]))
        checkpoints = [r for r in runs.read_records(env_path) if r["kind"] == "checkpoint"]
        done = json.loads((env_path / "done.json").read_text())
        # best.pt is the start-checkpoint rule's pick (model_save 100: the last step here)
        recorded = start_checkpoint(checkpoints, 100, checkpoints[-1]["step"]) if row["model"] == "best" else done["SWAD"]
        assert row["accuracy"][row["held_out"]] == pytest.approx(recorded["test_acc"], abs=1e-6)  # the whole held-out domain


def test_eval_teacher_zero_shot_from_the_cache(pipeline_run, monkeypatch):
    tmp, root, runs_root, cache, _ = pipeline_run
    accs = ok_json("eval", run_dir(runs_root, 1, "align"), "--teacher")
    index = scan_dataset(root)
    targets = load_targets(cache, index)
    pred = (targets.image @ targets.text.T).argmax(1)
    labels = torch.tensor([f.label for f in index.files])
    domains = torch.tensor([f.domain for f in index.files])
    expected = {d: float((pred == labels)[domains == i].float().mean()) for i, d in enumerate(DOMAINS)}
    assert accs == pytest.approx(expected)
    monkeypatch.setenv("VL2V_CACHE", str(tmp / "cache"))
    assert ok_json("eval", root, "--teacher") == accs  # a dataset folder: its one cache under $VL2V_CACHE


def test_config_file_and_flags_through_the_cli(pipeline_run, tmp_path):
    _, root, _, cache, _ = pipeline_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 2, "lr": 0.5, "checkpoint_freq": 7, "swad": False}))
    out = tmp_path / "align"
    finals = ok_json("align", root, *TINY, "--config", cfg, "--lr", "0.01", "--test-env", "photo", "--cache-dir", cache, "--run-dir", out)
    assert list(finals) == ["photo"] and list(finals["photo"]) == ["training-domain validation"]
    saved = runs.run_info(out)["config"]
    assert (saved["steps"], saved["lr"], saved["checkpoint_freq"], saved["swad"], saved["test_envs"]) == (2, 0.01, 7, False, ["photo"])
    assert [r["step"] for r in runs.read_records(runs.env_dir(out, 1)) if r["kind"] == "checkpoint"] == [0, 1]


# --- bad input ------------------------------------------------------------------------------------


def test_eval_of_a_folder_that_is_not_a_run(pipeline_run, tmp_path):
    assert_user_error(invoke("eval", tmp_path, "--json"), f"{tmp_path} is not a vl2v run directory", "config.json")


def test_distill_from_a_distill_run(pipeline_run):
    _, _, runs_root, _, _ = pipeline_run
    distill = run_dir(runs_root, 0, "distill")
    assert_user_error(invoke("distill", "--from", distill, "--steps", "1", "--workers", "0"), f"--from {distill} is a distill run", "distill starts from a run of method 'align'")


def test_cache_built_for_other_classes(pipeline_run, tmp_path):
    _, _, _, cache, _ = pipeline_run
    other = make_dataset(tmp_path / "toy", classes=("cow", "horse"))
    out = tmp_path / "run"
    assert_user_error(invoke("align", other, *TINY, "--steps", "1", "--cache-dir", cache, "--run-dir", out), f"Cache {cache} was built for other classes", "vl2v embed")
    assert not out.exists()


def test_unknown_timm_name(pipeline_run, tmp_path):
    _, root, _, cache, _ = pipeline_run
    out = tmp_path / "run"
    args = ["align", root, "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--steps", "1", "--test-env", "art", "--cache-dir", cache, "--run-dir", out]
    assert_user_error(invoke(*args, "--student", "test_vitt"), "Unknown student 'test_vitt'", "Did you mean 'test_vit'?")
    assert_user_error(invoke(*args[:-2], "--student", "resnet5O"), "Unknown student 'resnet5O'", "Did you mean")  # default run dir too
    # the mistake leaves no run behind: the corrected command starts afresh in the same run dir
    assert ok_json(*args, "--student", "test_vit")["art"]


def test_held_out_domain_that_does_not_exist(pipeline_run, tmp_path):
    _, root, runs_root, cache, _ = pipeline_run
    out = tmp_path / "run"
    assert_user_error(invoke("align", root, *TINY, "--steps", "1", "--test-env", "nope", "--cache-dir", cache, "--run-dir", out), "Unknown domain 'nope'", "art, photo, sketch")
    assert not out.exists()
    align = run_dir(runs_root, 0, "align")
    assert_user_error(invoke("distill", "--from", align, "--steps", "1", "--test-env", "nope", "--workers", "0"), "no finished model for held-out domain 'nope'")


def test_settings_refused_before_the_run_directory_is_made(pipeline_run, tmp_path):
    _, root, _, cache, _ = pipeline_run
    out = tmp_path / "run"
    args = ["align", root, *TINY, "--steps", "1", "--test-env", "art", "--cache-dir", cache, "--run-dir", out, "--device", "cpu"]
    assert_user_error(invoke(*args, "--precision", "fp16"), "--precision fp16 needs a CUDA device")
    assert_user_error(invoke(*args, "--lmd", "2"), "--lmd must be between 0 and 1")
    assert not out.exists()


def test_run_with_a_complete_cache_needs_no_teacher_weights(tmp_path, monkeypatch):
    """The weights moved after embedding: training (and `vl2v run`) uses the cache as it is."""
    from conftest import write_tiny_teacher

    root = make_dataset(tmp_path / "toy", per_class=2)
    spec = write_tiny_teacher(tmp_path)
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    assert invoke("embed", root, "--teacher", spec, "--workers", "0").exit_code == 0
    (tmp_path / "tiny-clip.pt").rename(tmp_path / "elsewhere.pt")
    rows = ok_json("run", root, *TINY, "--steps", "1", "--teacher", spec, "--test-env", "art", "--methods", "align", "--run-dir", tmp_path / "exp")
    assert [r["method"] for r in rows] == ["teacher zero-shot", "align", "align"]
    assert list(rows[0]["domains"]) == ["art"]  # the teacher's row has the methods' columns
