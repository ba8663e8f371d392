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


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> str:
    """A `--teacher` spec for a random-weight tiny CLIP with saved weights."""
    import open_clip

    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    weights = tmp_path / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return f"{config}:{weights}"
