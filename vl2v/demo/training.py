"""What the demo's own training jobs (its teacher, its student's pretraining) share: a learning-rate
schedule and artefacts named after the parameters that made them."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first `warmup_frac` of `steps`, then cosine decay to zero."""
    warmup = max(1, int(warmup_frac * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def params_tag(params: dict) -> str:
    """8 hex digits of the parameters' digest. Artefacts carry it in their file names, so that other
    parameters make other files: caches and run directories keyed by a file's path never take an
    artefact of one recipe for another's."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def read_params(meta_json: Path) -> dict | None:
    """The parameters a meta file records (written last, it marks its artefact complete)."""
    try:
        return json.loads(Path(meta_json).read_text())["params"]
    except (OSError, ValueError, KeyError):
        return None
