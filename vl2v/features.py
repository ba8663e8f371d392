"""Fast Align: a frozen, eval-mode featurizer's outputs for every (training image, cached view) and
every evaluation image, computed once beside the run; the projection then trains on those.

    RUN/features/<student>-<key>/meta.json        what the key stands for (student, hash of the
                                                  featurizer's weights, input size, normalisation,
                                                  autocast, the cached views' digest)
    RUN/features/<student>-<key>/train-<rows>.npy [R × K, F] float32: view k of the i-th training
                                                  row (sorted) at i × K + k
    RUN/features/<student>-<key>/eval-<rows>.npy  [E, F] float32: the evaluation images, in the
                                                  batches evaluation uses
Each file is filled batch by batch into a temporary file, its progress recorded after every batch,
and renamed when whole: a killed run resumes where it stopped, with the same batches, so the
features equal an uninterrupted run's. Held-out domains whose featurizers have the same weights (a
pretrained student) share the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader

from vl2v.batches import StepBatches
from vl2v.data import ImageDataset, build_eval_transform
from vl2v.runtime import atomic_write_json
from vl2v.student import DataConfig
from vl2v.viewcache import ParamsFile, ViewTargets
from vl2v.views import ViewImages

log = logging.getLogger(__name__)


def train_mode_effect(featurizer: nn.Module, freeze_bn: bool) -> str | None:
    """What makes the featurizer's output in training mode differ from eval mode; None: nothing, so
    features computed once in eval mode are the ones every training step would compute."""
    if not freeze_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in featurizer.modules()):
        return "its BatchNorm layers train in training mode (--no-freeze-bn), so its features depend on the batch"
    for name, m in featurizer.named_modules():
        if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or getattr(m, "drop_prob", 0) > 0:
            return f"its {name} drops out in training mode, so its features are random"
    return None


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StoredViews:
    """All K cached views of each of `rows` (a `vl2v.views.ViewImages` parameter source)."""

    def __init__(self, params: ParamsFile, rows: np.ndarray, count: int):
        self.params, self.rows, self.count = params, rows, count

    def __call__(self, i: int, key: str, image) -> np.ndarray:
        return np.array(self.params.array[self.rows[i]])  # a copy: the mapping is read-only


class EvalFeatures:
    """Evaluation features in the batches of `vl2v.batches.EvalImages`: what a text head is applied to."""

    def __init__(self, features: np.ndarray, rows: np.ndarray, batch_size: int):
        self.features, self.rows, self.batch_size = features, rows, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.rows), self.batch_size):
            yield torch.from_numpy(np.array(self.features[start : start + self.batch_size]))


@dataclass
class FastFeatures:
    """The features one held-out domain's fast Align trains and validates on."""

    train: np.ndarray  # [R × K, F] memory-mapped
    rows: np.ndarray  # [R] sorted training rows
    count: int  # K
    eval: EvalFeatures

    def batches(self, steps: StepBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features [B, F], rows [B], views k [B]) of every step of `steps`: its batches, no image decoded."""
        for step in range(steps.start, steps.steps):
            rows, _, ks = steps.rows(step)
            at = np.searchsorted(self.rows, rows) * self.count + ks
            yield torch.from_numpy(np.asarray(self.train[at])), torch.from_numpy(rows), torch.from_numpy(ks)


def feature_dir(run_dir: Path, student: str, featurizer: nn.Module, data_cfg: DataConfig, amp: torch.dtype | None, views: ViewTargets) -> Path:
    """RUN/features/<student>-<key>, the key a hash of what the features depend on; meta.json says it."""
    meta = {"student": student, "weights": weights_hash(featurizer), "image_size": data_cfg.image_size, "mean": list(data_cfg.mean),
            "std": list(data_cfg.std), "autocast": str(amp), "views": views.digest, "view_count": views.count, "view_seed": views.seed}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(run_dir) / "features" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', student)}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "meta.json").exists():
        atomic_write_json(folder / "meta.json", meta)
    return folder


def _rows_digest(rows: np.ndarray, paths: list[str]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{paths[r]}\n".encode())
    return h.hexdigest()[:16]


def build_features(path: Path, shape: tuple[int, int], batches: Callable[[int], Iterable[torch.Tensor]], per_item: int,
                   forward: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """The [n, F] float32 file `path`, memory-mapped: `forward` over `batches(first item)` (inputs of
    whole items, `per_item` feature rows each), resumed from the recorded progress of a killed run."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    with FileLock(path.with_name(f".{path.name}.lock")):  # held-out domains trained at once share it
        if path.exists():
            return np.load(path, mmap_mode="r")
        tmp, progress = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.progress.json")
        done = json.loads(progress.read_text())["done"] if tmp.exists() and progress.exists() else 0
        out = np.lib.format.open_memmap(tmp, mode="r+" if done else "w+", dtype=np.float32, shape=shape)
        for inputs in batches(done // per_item):
            features = forward(inputs)
            out[done : done + len(features)] = features
            done += len(features)
            out.flush()
            atomic_write_json(progress, {"done": done})
        del out
        os.replace(tmp, path)
        progress.unlink()
    return np.load(path, mmap_mode="r")


def _forward(featurizer: nn.Module, device: torch.device, amp: torch.dtype | None) -> Callable[[torch.Tensor], np.ndarray]:
    def forward(images: torch.Tensor) -> np.ndarray:
        featurizer.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return featurizer(images.to(device, non_blocking=True)).float().cpu().numpy()

    return forward


def prepare_fast_features(folder: Path, featurizer: nn.Module, data_cfg: DataConfig, views: ViewTargets, root: Path, paths: list[str],
                          train_rows: np.ndarray, eval_rows: np.ndarray, batch_size: int, workers: int, device: torch.device,
                          amp: torch.dtype | None) -> FastFeatures:
    """Features of every view of `train_rows` and of `eval_rows` (evaluation's transform and batches),
    computed once into `folder` (see `feature_dir`) or read from it."""
    dim, count = featurizer.num_features, views.count
    forward = _forward(featurizer, device, amp)
    size = (data_cfg.image_size, data_cfg.image_size)
    per_batch = max(1, batch_size // count)  # images per forward: batch_size views

    def train_batches(start: int) -> Iterable[torch.Tensor]:
        rows = train_rows[start:]
        dataset = ViewImages(root, [paths[r] for r in rows], StoredViews(views.params, rows, count), size, data_cfg.mean, data_cfg.std)
        return (images.flatten(0, 1) for images, _, _ in DataLoader(dataset, batch_size=per_batch, num_workers=workers))

    def eval_batches(start: int) -> Iterable[torch.Tensor]:
        transform = build_eval_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
        dataset = ImageDataset(root, [paths[r] for r in eval_rows[start:]], transform, (3, *size))
        return (images for images, _, _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers))

    train_path = folder / f"train-{_rows_digest(train_rows, paths)}.npy"
    eval_path = folder / f"eval-{_rows_digest(eval_rows, paths)}.npy"
    if not (train_path.exists() and eval_path.exists()):
        log.info("fast Align: computing the featurizer's features of %d training views (%d images × %d) and %d evaluation images once, into %s",
                 len(train_rows) * count, len(train_rows), count, len(eval_rows), folder)
    train = build_features(train_path, (len(train_rows) * count, dim), train_batches, count, forward)
    evals = build_features(eval_path, (len(eval_rows), dim), eval_batches, 1, forward)
    return FastFeatures(train, train_rows, count, EvalFeatures(evals, eval_rows, batch_size))
