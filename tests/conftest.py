"""Tiny real fixtures: image folders made in tmp_path, a random-weight open_clip teacher config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

# One thread per process: on a small machine, several busy OpenMP threads per test process (and
# the subprocesses some tests start) slow each other down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "randomly initialised" notice

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_image(path: Path, seed: int, size: int = 24, mode: str = "RGB") -> Path:
    """A deterministic noise image whose mean colour depends on the seed."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 128 + (seed % 5) * 25).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_dataset(root: Path, domains=("art", "photo", "sketch"), classes=("cat", "dog", "sea_lion"), per_class: int = 4) -> Path:
    """root/<domain>/<class>/<n>.png, all decodable."""
    seed = 0
    for d in domains:
        for c in classes:
            for n in range(per_class):
                make_image(root / d / c / f"{n}.png", seed)
                seed += 1
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "toy")


def write_tiny_teacher(folder: Path) -> str:
    """A random-weight tiny CLIP config and its saved weights in `folder`; returns the `--teacher` spec."""
    import open_clip

    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), weights)
    return f"{config}:{weights}"


def make_cached_toy(folder: Path, per_class: int) -> tuple[Path, Path]:
    """A toy dataset and its tiny-teacher cache in `folder`: (dataset root, cache folder)."""
    from vl2v.data import scan_dataset
    from vl2v.embed import EmbedConfig, embed_dataset

    root = make_dataset(folder / "toy", per_class=per_class)
    cache = folder / "cache"
    embed_dataset(scan_dataset(root), cache, EmbedConfig(teacher=write_tiny_teacher(folder), workers=0, device="cpu", batch_size=32))
    return root, cache


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> str:
    return write_tiny_teacher(tmp_path)


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI's callback reconfigures the root logger (basicConfig(force=True)); undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def train_method(method: str, root: Path | None, flags: dict, run_dir: Path, cache_dir: Path | None = None, from_run: Path | None = None):
    """`pipeline.train` of one method with these settings; returns (run directory, finals)."""
    from vl2v import pipeline
    from vl2v.config import TrainConfig

    return pipeline.train(root, TrainConfig(method=method, **flags), run_dir, cache_dir, from_run=from_run)
