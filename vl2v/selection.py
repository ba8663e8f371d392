"""Model selection from a run's checkpoint records (DomainBed's `model_selection`), computed when
results are read, never frozen at training time. Each rule picks one checkpoint record."""

from __future__ import annotations

from collections.abc import Callable

from vl2v.data import suggest
from vl2v.runtime import UserError


def _first_max(records: list[dict], key: str) -> dict:
    best = records[0]
    for r in records[1:]:
        if r[key] > best[key]:  # strictly greater: the first maximum wins, as DomainBed
            best = r
    return best


def training_domain(records: list[dict], env: int | None) -> dict:
    """Mean accuracy on the training domains' "out" splits."""
    return _first_max(records, "tr_outacc")


def oracle(records: list[dict], env: int | None) -> dict:
    """Accuracy on the held-out domain's own "out" split (DomainBed's test-domain validation: an
    upper bound, not a fair selection)."""
    if env is None:
        raise UserError("--selection oracle needs a held-out domain; a --test-env none run has none.")
    return _first_max(records, f"env{env}_out_acc")


def last(records: list[dict], env: int | None) -> dict:
    """The final checkpoint."""
    return records[-1]


# CLI name -> (name in tables and records, rule)
SELECTIONS: dict[str, tuple[str, Callable[[list[dict], int | None], dict]]] = {
    "training-domain": ("training-domain validation", training_domain),
    "oracle": ("test-domain validation (oracle)", oracle),
    "last": ("last checkpoint", last),
}
SWAD = "SWAD"


def get_selection(name: str) -> tuple[str, Callable]:
    if name not in SELECTIONS:
        raise UserError(f"Unknown --selection '{name}'.{suggest(name, list(SELECTIONS))} Choose: {', '.join(SELECTIONS)}.")
    return SELECTIONS[name]


def start_checkpoint(records: list[dict], model_save: int, last_step: int) -> dict | None:
    """The checkpoint a continuing method (Distill) starts from, as the original's TE{env}_best.pth:
    the best training-domain validation accuracy at a step ≥ `model_save` (or the last step, for runs
    shorter than that), ties going to the later checkpoint. None while no checkpoint qualifies."""
    eligible = [r for r in records if r["step"] >= min(model_save, last_step)]
    if not eligible:
        return None
    best = eligible[0]
    for r in eligible[1:]:
        if r["tr_outacc"] >= best["tr_outacc"]:
            best = r
    return best
