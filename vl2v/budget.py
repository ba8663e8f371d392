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
    views: int = 0  # augmented views to pay for in this run (each one query)
    view_images: int = 0  # the images those views are of

    @property
    def queries(self) -> int:
        return self.images + self.views + self.prompts

    def __str__(self) -> str:
        views = ""
        if self.views:
            each, rest = divmod(self.views, self.view_images)
            views = f" + {self.view_images} images × {each} view{'s' if each > 1 else ''}" if not rest else f" + {self.views} views of {self.view_images} images"
        text = f"plan: {self.images} images{views} + {self.prompts} prompts = {self.queries} queries to pay ({self.cached} images cached"
        text += f", {self.left_out} left out by --budget subset" if self.left_out else ""
        return text + (f"; --max-queries {self.max_queries})" if self.max_queries is not None else ")")


def plan_queries(index: DatasetIndex, pending: list[int], prompts: int, cached: int, max_queries: int | None, budget: str = "refuse",
                 views: dict[int, int] | None = None) -> tuple[Plan, list[int], list[int]]:
    """The plan, the rows to embed now and the rows whose views to embed now. `views`: {row: views
    it lacks}. A plan over `max_queries` is refused with the options, or, with `budget="subset"`,
    cut to a stratified subset of the images, each with its views (the prompts are needed)."""
    if budget not in BUDGETS:
        raise UserError(f"--budget must be {' or '.join(BUDGETS)}, not '{budget}'.")
    if max_queries is not None and max_queries < 0:
        raise UserError(f"--max-queries must be ≥ 0, not {max_queries}.")
    views = views or {}
    plan = Plan(len(pending), prompts, cached, 0, max_queries, sum(views.values()), len(views))
    if max_queries is None or plan.queries <= max_queries:
        return plan, pending, sorted(views)
    if budget == "subset" and max_queries < prompts:
        raise UserError(f"{plan}: --max-queries {max_queries} does not cover the {prompts} class prompts; raise it to at least {prompts}.")
    waiting = set(pending)
    rows = _subset(index, waiting, views, max_queries - prompts)
    wanted = len(waiting | set(views))
    if budget == "refuse":
        each = ", each with its views" if views else ""
        fewer = "prompt templates (--prompts) or views (--views)" if views else "prompt templates (--prompts)"
        raise UserError(
            f"{plan}, over the budget. Options: --max-queries {plan.queries} to pay for all of it; "
            f"--budget subset to embed {len(rows)} of the {wanted} images{each}, stratified by domain × class; or fewer {fewer}."
        )
    images, view_rows = [r for r in rows if r in waiting], [r for r in rows if r in views]
    cut = Plan(len(images), prompts, cached, wanted - len(rows), max_queries, sum(views[r] for r in view_rows), len(view_rows))
    return cut, images, view_rows


def _subset(index: DatasetIndex, pending: set[int], views: dict[int, int], fits: int) -> list[int]:
    """The longest prefix of the stratified order of the rows wanting something that fits in `fits`
    queries (an image costs 1 if its embedding is pending, plus the views it lacks); sorted."""
    taken, spent = [], 0
    for r in stratified_order(index, index.good):
        cost = (r in pending) + views.get(r, 0)
        if not cost:
            continue
        if spent + cost > fits:
            break
        taken.append(r)
        spent += cost
    return sorted(taken)


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
