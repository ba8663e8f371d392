"""Accuracies per domain and split: the student's text-head predictions and the teacher's zero-shot."""

from __future__ import annotations

import numpy as np
import torch

from vl2v.cache import Targets
from vl2v.data import DatasetIndex


def teacher_zero_shot(targets: Targets, index: DatasetIndex, splits: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Zero-shot accuracy of the cached teacher embeddings against the cached class embeddings:
    per domain over all its usable images, or per split name when `splits` is given."""
    labels = torch.tensor([f.label for f in index.files])
    correct = (targets.image @ targets.text.T).argmax(dim=1) == labels
    valid = targets.valid.numpy()
    if splits is None:
        domains = np.array([f.domain for f in index.files])
        splits = {d: np.flatnonzero((domains == i) & valid) for i, d in enumerate(index.domains)}
    return {name: float(correct[rows].float().mean()) if len(rows) else float("nan") for name, rows in splits.items()}
