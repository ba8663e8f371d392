"""Rich tables for the CLI's human-readable output (JSON is printed from the same dicts)."""

from __future__ import annotations

import csv
import io

from rich.table import Table

MAX_CLASS_COLUMNS = 12


def pct(x: float | None) -> str:
    """A fraction as a percentage; `-` for none (NaN, or a deployment run's missing test figures)."""
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def dataset_tables(summary: dict) -> list[Table]:
    """Per-domain counts (and per class when there are few classes), then skipped files."""
    title = f"{summary['name']}" + (f" (DomainBed {summary['domainbed']})" if summary["domainbed"] else "")
    table = Table(title=f"{title}: {len(summary['classes'])} classes, trial seed {summary['trial_seed']}")
    few = len(summary["classes"]) <= MAX_CLASS_COLUMNS
    for col in ["domain", "images", *(summary["classes"] if few else []), "in", "out"]:
        table.add_column(col, justify="left" if col == "domain" else "right")
    for d in summary["domains"]:
        counts = [str(d["classes"][c]) for c in summary["classes"]] if few else []
        table.add_row(d["name"], str(d["images"]), *counts, str(d["in"]), str(d["out"]))
    tables = [table]
    if summary["skipped"]:
        skipped = Table(title=f"{len(summary['skipped'])} unreadable file(s), excluded everywhere")
        skipped.add_column("file")
        skipped.add_column("reason")
        for s in summary["skipped"]:
            skipped.add_row(s["path"], s["reason"])
        tables.append(skipped)
    notes = [f"{n} {kind.replace('_', '-')} file(s) ignored" for kind, n in summary["ignored"].items() if n]
    notes += [f"{d} has no {', '.join(m)}" for d, m in summary["missing_classes"].items()]
    if summary["empty_class_folders"]:
        notes.append(f"empty class folder(s) ignored, not classes: {', '.join(summary['empty_class_folders'])}")
    if notes:
        table.caption = "; ".join(notes)
    return tables


def embed_tables(summary: dict) -> list[Table]:
    """What this run paid for, and the teacher's zero-shot accuracy per domain from the cache."""
    paid = Table(title=f"teacher cache {summary['cache_dir']}" + ("" if summary["complete"] else " (incomplete: other --shard parts pending)"))
    views = summary.get("views") or 0
    columns = ["embedded now", "reused", "unreadable", "text queries now", "image queries total", "text queries total"]
    q = summary["queries_total"]
    cells = [summary["embedded"], summary["reused"], summary["failed"], summary["text_queries"], q["images"], q["texts"]]
    if views:
        columns[1:1], cells[1:1] = ["views now"], [summary["views_embedded"]]
    for col in columns:
        paid.add_column(col, justify="right")
    paid.add_row(*(str(c) for c in cells))
    notes, cost = [], summary.get("cost") or {}
    if views:
        notes.append(f"{views} views per image")
    if cost.get("requests"):
        viewed = f" + {cost['view_queries']} view" if cost.get("view_queries") else ""
        notes.append(f"this run paid {cost['image_queries']} image{viewed} + {cost['text_queries']} text queries in {cost['requests']} requests")
    if cost.get("bytes_sent"):  # a teacher server
        notes.append(f"{cost['retries']} retries, {cost['bytes_sent']:,} bytes sent, {cost['from_record']} answered from the server's record")
    if summary.get("plan", {}).get("left_out"):
        notes.append(f"{summary['plan']['left_out']} images left without targets by --budget subset")
    paid.caption = "; ".join(notes) or None
    tables = [paid]
    if summary["zero_shot"]:
        tables.append(zero_shot_table(summary["zero_shot"]))
    return tables


def finals_table(finals: dict) -> Table:
    """A run's result per held-out domain: both selections, DomainBed's split and the whole domain."""
    table = Table(title="held-out-domain accuracy (%): test 'in' split / whole domain")
    table.add_column("held-out domain")
    selections = sorted({s for f in finals.values() for s in f}, reverse=True)
    for s in selections:
        table.add_column(s, justify="right")
    for domain, by_selection in finals.items():
        cells = [_final_cell(f) if (f := by_selection.get(s)) else "-" for s in selections]
        table.add_row(domain, *cells)
    return table


def _final_cell(final: dict) -> str:
    """Test 'in' split / whole domain; a deployment run has no test domain: its training domains'
    validation accuracy instead."""
    if final["test_acc"] is None:
        return f"validation {pct(final['tr_outacc'])}"
    return f"{pct(final['test_in_acc'])} / {pct(final['test_acc'])}"


def zero_shot_table(accs: dict[str, float]) -> Table:
    table = Table(title="teacher zero-shot accuracy (%) from the cache")
    for name in accs:
        table.add_column(name, justify="right")
    table.add_row(*(pct(v) for v in accs.values()))
    return table


def eval_table(rows: list[dict]) -> Table:
    domains = list(dict.fromkeys(d for r in rows for d in r["accuracy"]))
    table = Table(title="accuracy (%) per domain of the evaluated data")
    table.add_column("trained without")
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    for r in rows:
        table.add_row(r["held_out"], r["model"], *(pct(r["accuracy"].get(d, float("nan"))) for d in domains))
    return table


def predictions_table(predictions: list[dict]) -> Table:
    table = Table(title="predictions (probability %)")
    table.add_column("image")
    table.add_column("class")
    table.add_column("%", justify="right")
    table.add_column("next")
    for p in predictions:
        first, *rest = p["top_k"]
        table.add_row(p["path"], first["class"], pct(first["probability"]), ", ".join(f"{t['class']} {pct(t['probability'])}" for t in rest))
    return table


def predictions_csv(predictions: list[dict]) -> str:
    """One row per (image, rank): path, rank (1 = most probable), class, probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "probability"])
    for p in predictions:
        writer.writerows([p["path"], rank, t["class"], f"{t['probability']:.6g}"] for rank, t in enumerate(p["top_k"], 1))
    return buffer.getvalue()
