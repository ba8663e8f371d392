"""What the benchmarks share: how they start (torch threads, quiet logs) and the environment each
result records."""

from __future__ import annotations

import importlib
import logging
import os

import torch


def start(threads: int | None) -> None:
    """Torch on `threads` threads (None: torch's default); only errors are logged (open_clip's notices
    about random weights would drown the figures)."""
    if threads:
        torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.ERROR)


def environment(*packages: str) -> dict:
    """Versions of torch and `packages`, torch's threads, the cores and the load average at the start."""
    versions = {name: importlib.import_module(name).__version__ for name in ("torch", *packages)}
    return {**versions, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
