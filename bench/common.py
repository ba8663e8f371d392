"""What the benchmarks share: how they start (torch threads, quiet logs) and the environment each
result records."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from pathlib import Path

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


def settings(args: argparse.Namespace) -> dict:
    """A benchmark's arguments as its result records them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_result(result: dict, out: Path) -> None:
    """The result as JSON (anything else, such as a path, as its string), and where it went."""
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
