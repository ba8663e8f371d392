"""A shortened `vl2v demo` end to end: data, teacher, pretrained student, embed, ERM, KD, Align, Distill, SWAD, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from test_distributed import torchrun
from vl2v.cli import app


def test_quick_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["domains"] == ["mnist", "mnist_m", "synth", "uci"]
    assert summary["images"] == 4 * 10 * 6
    assert summary["queries"] == {"images": 240, "texts": 10}  # every image and prompt paid once
    assert (summary["views"]["count"], summary["views"]["queries"]) == (8, 240 * 8)  # and 8 views of each image
    assert set(summary["teacher_zero_shot"]) == set(summary["domains"])
    stages = {(r["method"], r["selection"]) for r in summary["results"]}
    assert stages == {(s, sel) for s in ("align", "distill", "erm", "kd") for sel in ("training-domain validation", "SWAD")}
    for row in summary["results"]:
        assert set(row["domains"]) == set(summary["domains"]) and row["avg"] is not None
    runs = tmp_path / "demo" / "runs" / "DigitsDG"
    assert (runs / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (runs / "report.md").read_text()
    assert "| held-out domain | teacher zero-shot | ERM | ERM + SWAD | KD | KD + SWAD | Align | Distill | Distill + SWAD |" in report
    assert "| average | " in report
    assert (tmp_path / "demo" / "samples.png").exists()

    again = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json"])
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert rerun["embedded_now"] == 0  # data, teacher and cache are reused: nothing paid twice
    assert rerun["results"] == summary["results"]

    two = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path / "demo"), "--trials", "2", "--json"])
    assert two.exit_code == 0, two.output
    trials = json.loads(two.stdout)
    assert trials["trials"] == [0, 1] and trials["embedded_now"] == 0  # trial 1 trained; trial 0 reused
    for row, first in zip(trials["results"], summary["results"]):
        for d in summary["domains"]:
            assert len(row["domains"][d]["values"]) == 2 and row["domains"][d]["values"][0] == first["domains"][d]["values"][0]
    assert "mean over 2 trials" in (runs / "report.md").read_text()
    assert CliRunner().invoke(app, ["demo", "--quick", "--trials", "0"]).exit_code == 2


def test_the_quick_demo_under_torchrun_prints_one_process_s_figures(tmp_path):
    """Two processes share the work (teacher beside student pretraining, then held-out domains) and
    rank 0 alone reports the same results as one process."""
    cache = {"VL2V_CACHE": str(tmp_path / "cache")}
    args = ["demo", "--quick", "--json"]
    two = torchrun([*args, "--workdir", str(tmp_path / "two")], tmp_path, cache)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vl2v", *args, "--workdir", str(tmp_path / "one")], env={**os.environ, "OMP_NUM_THREADS": "1", **cache},
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    summary2, summary1 = json.loads(two.stdout), json.loads(one.stdout)  # one JSON document: rank 0's
    assert (summary2["processes"], summary1["processes"]) == (2, 1)
    assert summary2["results"] == summary1["results"] and len(summary2["results"]) == 8
    assert summary2["teacher_zero_shot"] == summary1["teacher_zero_shot"]
