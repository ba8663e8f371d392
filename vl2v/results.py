"""Read run records and build DomainBed-style result tables (rich, Markdown, JSON)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.table import Table

from vl2v import runs
from vl2v.methods import METHODS
from vl2v.runtime import UserError
from vl2v.selection import SWAD, get_selection

TEACHER = "teacher zero-shot"


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or below `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Runs folder not found: {root}")
    return sorted(p.parent for p in root.rglob(runs.CONFIG) if "config" in runs.run_info(p.parent))


def _metric_of(record: dict, env: int, metric: str) -> float:
    return record[f"env{env}_in_acc"] if metric == "test_in_acc" else record["test_acc"]


def selected(run_dir: Path, env: int, selection: str, metric: str = "test_in_acc") -> dict[str, float]:
    """{table name: test figure} of one finished held-out domain: the model the selection rule picks
    from its checkpoint records, and the SWAD model."""
    done = runs.read_final(runs.env_dir(run_dir, env)) or {}
    checkpoints = [r for r in runs.read_records(runs.env_dir(run_dir, env)) if r.get("kind") == "checkpoint"]
    if not done or not checkpoints:
        return {}
    name, rule = get_selection(selection)
    out = {name: _metric_of(rule(checkpoints, env), env, metric)}
    if SWAD in done:
        out[SWAD] = done[SWAD][metric]
    return out


def collect(root: Path, metric: str = "test_in_acc", selection: str = "training-domain") -> list[dict]:
    """One row per (dataset, student, method, selection): per held-out domain, the accuracies over
    trial seeds, their mean and std, and the average over domains. Deployment runs (no held-out
    domain) have no test figures and no row."""
    get_selection(selection)
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    domains: dict[str, list[str]] = {}
    for run_dir in find_runs(root):
        info = runs.run_info(run_dir)
        cfg, dataset = info["config"], info["dataset"]["name"]
        domains[dataset] = info["dataset"]["domains"]
        for env, domain in enumerate(info["dataset"]["domains"]):
            for name, value in selected(run_dir, env, selection, metric).items():
                groups[(dataset, cfg["student"], cfg["method"], name)][domain].append(value)
    return [_row(dataset, student, method, sel, per_domain, domains[dataset])
            for (dataset, student, method, sel), per_domain in sorted(groups.items(), key=_order)]


def teacher_row(dataset: str, domains: list[str], per_domain: dict[str, list[float]]) -> dict:
    """The teacher's zero-shot accuracy as a result row (one value per trial seed and domain)."""
    return _row(dataset, "-", TEACHER, "-", per_domain, domains)


def _row(dataset: str, student: str, method: str, selection: str, per_domain: dict[str, list[float]], domain_order: list[str]) -> dict:
    cells = {d: _stats(v) for d, v in per_domain.items()}
    complete = all(d in cells for d in domain_order)
    return {
        "dataset": dataset,
        "student": student,
        "method": method,
        "selection": selection,
        "domains": cells,
        "avg": float(np.mean([cells[d]["mean"] for d in domain_order])) if complete else None,
        "domain_order": domain_order,
    }


def _order(item):
    (dataset, student, method, selection), _ = item
    methods = list(METHODS)
    return dataset, student, methods.index(method) if method in methods else len(methods), selection == SWAD, selection


def _stats(values: list[float]) -> dict:
    a = np.array(values) * 100
    return {"mean": float(a.mean()), "std": float(a.std()), "n": len(a), "values": a.tolist()}


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}" if stats["n"] > 1 else f"{stats['mean']:.1f}"


def _grid(rows: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per dataset: the header and the text cells of every row."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    for row in rows:
        header = ["student", "method", "selection", *row["domain_order"], "avg"]
        cells = [row["student"], row["method"], row["selection"], *(_cell(row["domains"].get(d)) for d in row["domain_order"])]
        cells.append("-" if row["avg"] is None else f"{row['avg']:.1f}")
        tables.setdefault(row["dataset"], (header, []))[1].append(cells)
    return tables


def rich_tables(rows: list[dict]) -> list[Table]:
    out = []
    for dataset, (header, body) in _grid(rows).items():
        table = Table(title=f"{dataset}: held-out-domain accuracy (%), test domain's 'in' split")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 3 else "right")
        for cells in body:
            table.add_row(*cells)
        out.append(table)
    return out


def markdown(rows: list[dict]) -> str:
    parts = []
    for dataset, (header, body) in _grid(rows).items():
        parts.append(f"### {dataset}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        parts.extend("| " + " | ".join(cells) + " |" for cells in body)
        parts.append("")
    return "\n".join(parts)
