"""Resumable runs: a real `kill -9` mid-training, then the same command, equals an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cached_toy
from typer.testing import CliRunner

import vl2v.train
from vl2v import runs
from vl2v.cli import app
from vl2v.runtime import load_checkpoint

ENVS = ("art", "photo")  # two held-out domains: the resumed run also has a domain still to start
STEPS, FREQ = 15, 3
CHECKPOINTS = 6  # steps 0, 3, 6, 9, 12, and the last step, 14


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    root, cache = make_cached_toy(tmp, per_class=5)
    return tmp, root, cache


def align_args(root: Path, cache: Path, run_dir: Path, lr: str = "0.001") -> list[str]:
    args = ["align", str(root), "--student", "test_vit", "--no-pretrained", "--image-size", "32", "--steps", str(STEPS),
            "--checkpoint-freq", str(FREQ), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--lr", lr,
            "--cache-dir", str(cache), "--run-dir", str(run_dir), "--json"]
    for env in ENVS:
        args += ["--test-env", env]
    return args


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same arithmetic in every run
    cmd = [sys.executable, "-c", "from vl2v.cli import main; main()", *args]
    return subprocess.Popen(cmd, stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"), env=env)


def records(env_path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in runs.read_records(env_path)]


@pytest.fixture(scope="module")
def killed_and_resumed(cached):
    """Reference and resumed run dirs, their stdout, how many records the killed run had written."""
    tmp, root, cache = cached
    ref_dir, run_dir = tmp / "runs" / "reference", tmp / "runs" / "killed"
    victim = start(align_args(root, cache, run_dir), tmp / "victim")
    env0 = run_dir / "env0"
    deadline = time.monotonic() + 120
    try:
        while True:  # kill once the first domain has a checkpoint and a few validation records
            assert victim.poll() is None, "the run ended before it could be killed: " + (tmp / "victim.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            if (env0 / "checkpoint.pt").exists() and len(runs.read_records(env0)) >= 2:
                break
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (env0 / "done.json").exists(), "killed too late: the first domain had finished"
    interrupted_at = len(runs.read_records(env0))

    resumed = start(align_args(root, cache, run_dir), tmp / "resumed")
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    try:  # the uninterrupted run, in this process while the resumed one starts up
        reference = CliRunner().invoke(app, align_args(root, cache, ref_dir))
        assert reference.exit_code == 0, reference.output
        assert resumed.wait(300) == 0, (tmp / "resumed.err").read_text()[-3000:]
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        if resumed.poll() is None:
            resumed.kill()
    return ref_dir, run_dir, (tmp / "resumed.out").read_text(), reference.stdout, interrupted_at


def test_kill_9_then_resume_equals_an_uninterrupted_run(killed_and_resumed):
    ref_dir, run_dir, resumed_out, reference_out, interrupted_at = killed_and_resumed
    assert 2 <= interrupted_at < CHECKPOINTS
    for env in (0, 1):
        ref, res = runs.env_dir(ref_dir, env), runs.env_dir(run_dir, env)
        ref_records = records(ref)
        assert len([r for r in ref_records if r["kind"] == "checkpoint"]) == CHECKPOINTS
        assert records(res) == ref_records
        assert json.loads((res / "done.json").read_text()) == json.loads((ref / "done.json").read_text())
        for name in ("best.pt", "swad.pt"):
            a, b = load_checkpoint(ref / name), load_checkpoint(res / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (env, name)
        assert not (res / "checkpoint.pt").exists()
    assert json.loads(resumed_out) == json.loads(reference_out)  # the same final table, as JSON


def test_rerunning_a_finished_run_does_nothing_and_prints_the_same_results(killed_and_resumed, cached, monkeypatch):
    tmp, root, cache = cached
    ref_dir, run_dir, resumed_out, _, _ = killed_and_resumed

    def refuse(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(vl2v.train, "build_student", refuse)
    files = [runs.env_dir(run_dir, e) / n for e in (0, 1) for n in ("results.jsonl", "done.json", "best.pt", "swad.pt")]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    result = CliRunner().invoke(app, align_args(root, cache, run_dir))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(resumed_out)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    assert not any((runs.env_dir(run_dir, e) / "checkpoint.pt").exists() for e in (0, 1))


def test_rerunning_with_another_setting_is_refused(killed_and_resumed, cached):
    tmp, root, cache = cached
    _, run_dir, _, _, _ = killed_and_resumed
    before = (run_dir / "config.json").read_text()
    result = CliRunner().invoke(app, align_args(root, cache, run_dir, lr="0.002"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "already holds a run with other settings" in errors[0] and "lr: 0.001 → 0.002" in errors[0]
    assert str(run_dir) in errors[0]
    assert (run_dir / "config.json").read_text() == before  # nothing overwritten
