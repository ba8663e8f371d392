"""Result tables from hand-written run records: grouping, mean ± std over trials, averages, output forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vl2v.cli import app
from vl2v.results import collect, find_runs, markdown, rich_tables
from vl2v.runtime import UserError

TDV, SWAD = "training-domain validation", "SWAD"
DOMAINS = ["art", "photo", "sketch"]


def write_run(run_dir: Path, method: str, finals: dict[int, dict[str, float]], *, student="vits", dataset="Toy", domains=DOMAINS, test_acc_offset=0.0) -> Path:
    """A run directory as vl2v writes it: config.json, env{i}/results.jsonl (one checkpoint, whose
    test figure is the TDV value) and env{i}/done.json."""
    run_dir.mkdir(parents=True)
    info = {"config": {"method": method, "student": student}, "dataset": {"name": dataset, "domains": domains, "classes": ["a", "b"]}}
    (run_dir / "config.json").write_text(json.dumps(info))
    for env, by_selection in finals.items():
        done = {sel: {"selection": sel, "test_env": env, "test_in_acc": acc, "test_acc": acc + test_acc_offset} for sel, acc in by_selection.items()}
        (run_dir / f"env{env}").mkdir()
        (run_dir / f"env{env}" / "done.json").write_text(json.dumps(done))
        acc = by_selection[TDV]
        record = {"kind": "checkpoint", "step": 0, f"env{env}_in_acc": acc, f"env{env}_out_acc": acc, "test_acc": acc + test_acc_offset, "tr_outacc": 0.5}
        (run_dir / f"env{env}" / "results.jsonl").write_text(json.dumps(record) + "\n" + "\n".join(json.dumps(f) for f in done.values()) + "\n")
    return run_dir


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    t0 = {0: {TDV: 0.80, SWAD: 0.90}, 1: {TDV: 0.60, SWAD: 0.70}, 2: {TDV: 0.50, SWAD: 0.55}}
    t1 = {0: {TDV: 0.90, SWAD: 0.92}, 1: {TDV: 0.70, SWAD: 0.70}, 2: {TDV: 0.40, SWAD: 0.45}}
    # written distill-first and trial 1 first: the table order must not depend on it
    write_run(root / "Toy/vits/trial1/distill", "distill", {0: {TDV: 1.0, SWAD: 1.0}, 1: {TDV: 0.5, SWAD: 0.5}, 2: {TDV: 0.25, SWAD: 0.25}})
    write_run(root / "Toy/vits/trial1/align", "align", t1, test_acc_offset=0.01)
    write_run(root / "Toy/vits/trial0/align", "align", t0, test_acc_offset=0.01)
    write_run(root / "Toy/vits/trial0/distill", "distill", {0: {TDV: 0.0, SWAD: 0.5}, 1: {TDV: 0.5}})  # env2 unfinished
    (root / "Toy/vits/trial0/distill/env2").mkdir()
    (root / "Toy/vits/trial0/distill/env2/checkpoint.pt").write_bytes(b"")  # still training
    # not a run (a config.json that is not vl2v's): ignored
    (root / "Toy/scratch").mkdir(parents=True)
    (root / "Toy/scratch/config.json").write_text("{}")
    return root


def rows_by_key(rows):
    return {(r["method"], r["selection"]): r for r in rows}


def test_find_runs_lists_run_directories_only(runs_root):
    found = [p.relative_to(runs_root).as_posix() for p in find_runs(runs_root)]
    assert found == ["Toy/vits/trial0/align", "Toy/vits/trial0/distill", "Toy/vits/trial1/align", "Toy/vits/trial1/distill"]
    with pytest.raises(UserError, match="Runs folder not found"):
        find_runs(runs_root / "nope")


def test_collect_mean_std_over_trials_and_domain_average(runs_root):
    rows = collect(runs_root)
    assert [(r["method"], r["selection"]) for r in rows] == [("align", TDV), ("align", SWAD), ("distill", TDV), ("distill", SWAD)]
    by = rows_by_key(rows)
    art = by[("align", TDV)]["domains"]["art"]
    assert art["n"] == 2 and sorted(art["values"]) == pytest.approx([80.0, 90.0])
    assert art["mean"] == pytest.approx(85.0) and art["std"] == pytest.approx(5.0)  # population std of 80, 90
    cells = by[("align", TDV)]["domains"]
    assert [cells[d]["mean"] for d in DOMAINS] == pytest.approx([85.0, 65.0, 45.0])
    assert by[("align", TDV)]["avg"] == pytest.approx(65.0)
    assert by[("align", SWAD)]["avg"] == pytest.approx((91.0 + 70.0 + 50.0) / 3)
    assert by[("align", SWAD)]["domains"]["photo"]["std"] == pytest.approx(0.0)
    for r in rows:
        assert r["dataset"] == "Toy" and r["student"] == "vits" and r["domain_order"] == DOMAINS

    # Distill: trial 0 has not finished sketch, so sketch has one trial and the SWAD row lacks photo
    d_tdv, d_swad = by[("distill", TDV)], by[("distill", SWAD)]
    assert d_tdv["domains"]["sketch"]["n"] == 1 and d_tdv["domains"]["art"]["n"] == 2
    assert d_tdv["domains"]["art"]["mean"] == pytest.approx(50.0) and d_tdv["domains"]["art"]["std"] == pytest.approx(50.0)
    assert d_tdv["avg"] == pytest.approx((50.0 + 50.0 + 25.0) / 3)  # every domain has a value
    assert d_swad["domains"]["photo"]["n"] == 1
    assert set(d_swad["domains"]) == set(DOMAINS)


def test_average_is_missing_until_every_domain_has_a_result(tmp_path):
    write_run(tmp_path / "r", "align", {0: {TDV: 0.5}, 2: {TDV: 0.7}})
    (row,) = collect(tmp_path)
    assert set(row["domains"]) == {"art", "sketch"} and row["avg"] is None
    text = markdown([row])
    assert "| vits | align | training-domain validation | 50.0 | - | 70.0 | - |" in text


def test_metric_test_acc_reads_the_whole_domain_figure(runs_root):
    by = rows_by_key(collect(runs_root, "test_acc"))
    assert by[("align", TDV)]["domains"]["art"]["mean"] == pytest.approx(86.0)
    assert by[("align", TDV)]["avg"] == pytest.approx(66.0)


def test_several_students_and_datasets_get_their_own_rows_and_tables(tmp_path):
    write_run(tmp_path / "a", "align", {0: {TDV: 0.5}, 1: {TDV: 0.5}, 2: {TDV: 0.5}}, student="rn50")
    write_run(tmp_path / "b", "align", {0: {TDV: 0.6}, 1: {TDV: 0.6}, 2: {TDV: 0.6}}, student="vits")
    write_run(tmp_path / "c", "align", {0: {TDV: 0.7}, 1: {TDV: 0.7}}, dataset="Other", domains=["x", "y"])
    rows = collect(tmp_path)
    assert [(r["dataset"], r["student"], r["avg"]) for r in rows] == [("Other", "vits", pytest.approx(70.0)), ("Toy", "rn50", pytest.approx(50.0)), ("Toy", "vits", pytest.approx(60.0))]
    text = markdown(rows)
    assert text.count("### ") == 2 and "| student | method | selection | x | y | avg |" in text
    assert [t.title.split(":")[0] for t in rich_tables(rows)] == ["Other", "Toy"]


def test_markdown_table(runs_root):
    text = markdown(collect(runs_root))
    lines = text.splitlines()
    assert lines[0] == "### Toy"
    header = lines.index("| student | method | selection | art | photo | sketch | avg |")
    assert lines[header + 1] == "|---|---|---|---|---|---|---|"
    assert lines[header + 2] == "| vits | align | training-domain validation | 85.0 ± 5.0 | 65.0 ± 5.0 | 45.0 ± 5.0 | 65.0 |"
    assert "| vits | distill | SWAD | 75.0 ± 25.0 | 50.0 | 25.0 | 50.0 |" in lines  # one trial: no ±


def test_results_command(runs_root):
    result = CliRunner().invoke(app, ["results", str(runs_root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(collect(runs_root)))

    result = CliRunner().invoke(app, ["results", str(runs_root), "--markdown"])
    assert result.exit_code == 0 and result.stdout.strip() == markdown(collect(runs_root)).strip()

    result = CliRunner().invoke(app, ["results", str(runs_root), "--metric", "test_acc", "--json"])
    assert json.loads(result.stdout)[0]["domains"]["art"]["mean"] == pytest.approx(86.0)

    result = CliRunner().invoke(app, ["results", str(runs_root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Toy: held-out-domain accuracy" in result.stdout and "85.0 ± 5.0" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--metric", "acc"], "--metric must be test_in_acc or test_acc, not 'acc'"),
        ([], "No finished runs under"),
    ],
)
def test_results_command_errors(tmp_path, args, fragment):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["results", str(tmp_path / "empty"), *args])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and result.stdout == ""


def test_results_of_a_missing_folder(tmp_path):
    result = CliRunner().invoke(app, ["results", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.stderr.startswith("error: Runs folder not found")
