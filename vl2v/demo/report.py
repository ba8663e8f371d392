"""The demo's figure, Markdown report and plain-language summary."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vl2v.results import markdown
from vl2v.runtime import atomic_write_bytes

TDV = "training-domain validation"
# bar -> (method, selection) of the result rows; the teacher's bar comes from the cache
PICKS = {
    "ERM": ("erm", TDV),
    "ERM + SWAD": ("erm", "SWAD"),
    "KD": ("kd", TDV),
    "KD + SWAD": ("kd", "SWAD"),
    "Align": ("align", TDV),
    "Distill": ("distill", TDV),
    "Distill + SWAD": ("distill", "SWAD"),
}
BARS = ("teacher zero-shot", *PICKS)


def per_domain(summary: dict) -> dict[str, dict[str, float]]:
    """Accuracy (%) per held-out domain of each bar: the teacher's zero-shot, and each method's
    training-domain-validation and SWAD models."""
    rows = {(r["method"], r["selection"]): r["domains"] for r in summary["results"]}
    picks = {bar: rows.get(key, {}) for bar, key in PICKS.items()}
    out = {}
    for d in summary["domains"]:
        out[d] = {"teacher zero-shot": 100 * summary["teacher_zero_shot"][d]}
        out[d].update({bar: cells[d]["mean"] for bar, cells in picks.items() if d in cells})
    return out


def write_figure(summary: dict, path: Path) -> Path:
    """Grouped bars: per held-out domain, the teacher's zero-shot accuracy and every method's, with and without SWAD."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    accs = per_domain(summary)
    domains = list(accs)
    fig = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.85 / len(BARS)
    for k, bar in enumerate(BARS):
        values = [accs[d].get(bar, np.nan) for d in domains]
        ax.bar(np.arange(len(domains)) + (k - (len(BARS) - 1) / 2) * width, values, width, label=bar)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(domains)), [f"held out:\n{d}" for d in domains])
    ax.set_ylabel("accuracy on the held-out domain (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.25))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def plain_summary(summary: dict) -> list[str]:
    """A few sentences a new user can read without knowing the method."""
    accs = per_domain(summary)
    mean = {bar: np.nanmean([accs[d].get(bar, np.nan) for d in accs]) for bar in BARS}
    q, views = summary["queries"], summary["views"] or {"queries": 0, "count": 0}
    return [
        f"Digits-DG: {summary['images']:,} real digit images in 4 domains ({', '.join(summary['domains'])}); "
        "each domain in turn was held out and never seen in training.",
        f"Teacher (our small CLIP, zero-shot) on the held-out domains: {mean['teacher zero-shot']:.1f}% on average"
        + (f"; every figure is the mean over {len(summary['trials'])} trials (in/out splits), their spread in the result rows." if len(summary["trials"]) > 1 else "."),
        f"Student ({summary['config']['student']}, pretrained on letters and symbols), average over held-out domains: "
        f"VL2V-ADiP Distill with SWAD {mean['Distill + SWAD']:.1f}% (Distill {mean['Distill']:.1f}%, Align {mean['Align']:.1f}%); "
        f"baselines at the same steps: ERM {mean['ERM']:.1f}% (SWAD {mean['ERM + SWAD']:.1f}%), KD {mean['KD']:.1f}% "
        f"(SWAD {mean['KD + SWAD']:.1f}%); chance 10%.",
        f"Teacher queries paid: {q['images']:,} images, {views['queries']:,} augmented views ({views['count']} per image) and {q['texts']} prompts, once; "
        f"training ran {len(summary['config']['methods']) * len(summary['domains']) * len(summary['trials'])} student runs on those views without calling the teacher.",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ".",
    ]


def write_markdown(summary: dict, path: Path, samples_png: Path) -> Path:
    accs = per_domain(summary)
    lines = ["# vl2v demo: Digits-DG", "", *(f"- {s}" for s in plain_summary(summary)), ""]
    lines += ["## Accuracy (%) on each held-out domain (its DomainBed 'in' split)", ""]
    lines += ["| held-out domain | " + " | ".join(BARS) + " |", "|---" * (len(BARS) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(f"{accs[d].get(b, float('nan')):.1f}" for b in BARS) + " |" for d in accs]
    means = [np.nanmean([accs[d].get(b, np.nan) for d in accs]) for b in BARS]
    lines += ["| average | " + " | ".join(f"{m:.1f}" for m in means) + " |"]
    lines += ["", "![results](results.png)", "", "## All result rows", "", markdown(summary["results"])]
    lines += ["## Sample images per domain", "", f"![samples]({os.path.relpath(samples_png, path.parent)})", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
