"""Rich tables for the CLI's human-readable output (JSON is printed from the same dicts)."""

from __future__ import annotations

from rich.table import Table

MAX_CLASS_COLUMNS = 12


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


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
    if notes:
        table.caption = "; ".join(notes)
    return tables


def embed_tables(summary: dict) -> list[Table]:
    """What this run paid for, and the teacher's zero-shot accuracy per domain from the cache."""
    paid = Table(title=f"teacher cache {summary['cache_dir']}" + ("" if summary["complete"] else " (incomplete: other --shard parts pending)"))
    for col in ("embedded now", "reused", "unreadable", "text queries now", "image queries total", "text queries total"):
        paid.add_column(col, justify="right")
    q = summary["queries_total"]
    paid.add_row(str(summary["embedded"]), str(summary["reused"]), str(summary["failed"]), str(summary["text_queries"]), str(q["images"]), str(q["texts"]))
    tables = [paid]
    if summary["zero_shot"]:
        zs = Table(title="teacher zero-shot accuracy (%) from the cache")
        for name in summary["zero_shot"]:
            zs.add_column(name, justify="right")
        zs.add_row(*(pct(v) for v in summary["zero_shot"].values()))
        tables.append(zs)
    return tables
