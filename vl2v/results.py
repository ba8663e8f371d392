"""Read run records and build DomainBed-style result tables (rich, Markdown, JSON)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.table import Table

from vl2v import runs
from vl2v.runtime import UserError

SELECTIONS = ("training-domain validation", "SWAD")


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or below `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Runs folder not found: {root}")
    return sorted(p.parent for p in root.rglob(runs.CONFIG) if (p.parent / "cache_manifest.json").exists())


def collect(root: Path, metric: str = "test_in_acc") -> list[dict]:
    """One row per (dataset, student, stage, selection): per held-out domain, the accuracies over
    trial seeds, their mean and std, and the average over domains."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    domains: dict[str, list[str]] = {}
    for run_dir in find_runs(root):
        info = runs.run_info(run_dir)
        cfg, dataset = info["config"], info["dataset"]["name"]
        domains[dataset] = info["dataset"]["domains"]
        for env, domain in enumerate(info["dataset"]["domains"]):
            done = runs.read_final(runs.env_dir(run_dir, env)) or {}
            for selection, final in done.items():
                groups[(dataset, cfg["student"], cfg["stage"], selection)][domain].append(final[metric])
    rows = []
    for (dataset, student, stage, selection), per_domain in sorted(groups.items(), key=_order):
        cells = {d: _stats(v) for d, v in per_domain.items()}
        complete = all(d in cells for d in domains[dataset])
        means = [cells[d]["mean"] for d in domains[dataset] if d in cells]
        rows.append(
            {
                "dataset": dataset,
                "student": student,
                "stage": stage,
                "selection": selection,
                "domains": cells,
                "avg": float(np.mean(means)) if complete else None,
                "domain_order": domains[dataset],
            }
        )
    return rows


def _order(item):
    (dataset, student, stage, selection), _ = item
    return dataset, student, ("align", "distill").index(stage), SELECTIONS.index(selection)


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
        header = ["student", "stage", "selection", *row["domain_order"], "avg"]
        cells = [row["student"], row["stage"], row["selection"], *(_cell(row["domains"].get(d)) for d in row["domain_order"])]
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
