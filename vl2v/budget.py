"""What an embed run will pay for, compared with `--max-queries` before anything is paid, and
`--budget subset`: the subset, stratified by domain × class, that fits the budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vl2v.data import DatasetIndex
from vl2v.runtime import UserError

BUDGETS = ("refuse", "subset")


@dataclass(frozen=True)
class Plan:
    images: int  # images to pay for in this run
    prompts: int  # class prompts to pay for in this run
    cached: int  # images already in the cache
    left_out: int = 0  # images `--budget subset` leaves without a teacher target
    max_queries: int | None = None

    @property
    def queries(self) -> int:
        return self.images + self.prompts

    def __str__(self) -> str:
        text = f"plan: {self.images} images + {self.prompts} prompts = {self.queries} queries to pay ({self.cached} images cached"
        text += f", {self.left_out} left out by --budget subset" if self.left_out else ""
        return text + (f"; --max-queries {self.max_queries})" if self.max_queries is not None else ")")


def plan_queries(index: DatasetIndex, pending: list[int], prompts: int, cached: int, max_queries: int | None, budget: str = "refuse") -> tuple[Plan, list[int]]:
    """The plan and the rows to embed now. A plan over `max_queries` is refused with the options,
    or, with `budget="subset"`, cut to a stratified subset of the images (the prompts are needed)."""
    if budget not in BUDGETS:
        raise UserError(f"--budget must be {' or '.join(BUDGETS)}, not '{budget}'.")
    if max_queries is not None and max_queries < 0:
        raise UserError(f"--max-queries must be ≥ 0, not {max_queries}.")
    plan = Plan(len(pending), prompts, cached, 0, max_queries)
    if max_queries is None or plan.queries <= max_queries:
        return plan, pending
    if budget == "subset" and max_queries < prompts:
        raise UserError(f"{plan}: --max-queries {max_queries} does not cover the {prompts} class prompts; raise it to at least {prompts}.")
    if budget == "refuse":
        fits = max(max_queries - prompts, 0)
        raise UserError(
            f"{plan}, over the budget. Options: --max-queries {plan.queries} to pay for all of it; "
            f"--budget subset to embed {fits} of the {len(pending)} images, stratified by domain × class; "
            "or fewer prompt templates (--prompts)."
        )
    waiting = set(pending)
    rows = sorted([r for r in stratified_order(index, index.good) if r in waiting][: max_queries - prompts])
    return Plan(len(rows), prompts, cached, len(pending) - len(rows), max_queries), rows


def stratified_order(index: DatasetIndex, rows) -> list[int]:
    """`rows` ordered so that every prefix is a sample stratified by (domain, class): the j-th
    image of a stratum of size m comes at (j + 1/2) / m, so a prefix of n holds about n·m/N of it
    (each stratum's images in a random order seeded by its domain and class). The order depends on
    the dataset alone: a resumed or extended subset run finishes the subset it started."""
    strata: dict[tuple[int, int], list[int]] = {}
    for r in rows:
        f = index.files[int(r)]
        strata.setdefault((f.domain, f.label), []).append(int(r))
    ranked = []
    for key, members in strata.items():
        shuffled = np.random.default_rng(list(key)).permutation(sorted(members))
        ranked += [((j + 0.5) / len(members), key, int(r)) for j, r in enumerate(shuffled)]
    return [r for *_, r in sorted(ranked)]
