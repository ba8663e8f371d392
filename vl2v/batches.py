"""Student-side data: seeded per-step training batches and preloaded evaluation images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl2v.data import ImageDataset, load_rgb

EVAL_PRELOAD_BYTES = 1 << 30  # evaluation images are decoded once and kept when they fit in this


class StepBatches(Dataset):
    """Item i is the batch of training step `start + i`: `batch_size` rows drawn with replacement
    from every training domain's "in" rows, concatenated in domain order, each augmented with its
    own seed. A pure function of (seed, test env, step), so a resumed run sees the same batches
    whatever the number of workers, and DDP processes together see the batch of one process."""

    def __init__(self, root: Path, paths: list[str], domain_rows: list[np.ndarray], batch_size: int, transform, seed: tuple[int, ...], start: int, steps: int,
                 part: tuple[int, int] = (0, 1)):
        self.root, self.paths, self.domain_rows = Path(root), paths, domain_rows
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.start, self.steps = start, steps
        self.part = part  # (rank, world size): this process's contiguous slice of every batch (DDP)

    def __len__(self) -> int:
        return self.steps - self.start

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The dataset rows of a step's batch and their augmentation seeds."""
        rng = np.random.default_rng([*self.seed, step])
        rows = np.concatenate([r[rng.integers(len(r), size=self.batch_size)] for r in self.domain_rows])
        seeds = rng.integers(2**62, size=len(rows))
        rank, world = self.part
        per = len(rows) // world
        return rows[rank * per : (rank + 1) * per], seeds[rank * per : (rank + 1) * per]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, seeds = self.rows(self.start + i)
        images = []
        for row, seed in zip(rows, seeds):
            image = load_rgb(self.root / self.paths[row])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                images.append(self.transform(image))
        return torch.stack(images), torch.from_numpy(rows)


def step_loader(batches: StepBatches, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory, persistent_workers=False, prefetch_factor=2 if workers else None)


class EvalImages:
    """Evaluation inputs for a fixed set of rows: decoded once and kept in memory when they fit,
    otherwise streamed from disk at every evaluation."""

    def __init__(self, root: Path, paths: list[str], rows: np.ndarray, transform, size: tuple[int, int, int], batch_size: int, workers: int):
        self.rows = rows
        self.dataset = ImageDataset(root, [paths[r] for r in rows], transform, size)
        self.batch_size, self.workers = batch_size, workers
        self.cached: list[torch.Tensor] | None = None
        if len(rows) * int(np.prod(size)) * 4 <= EVAL_PRELOAD_BYTES:
            self.cached = [images for images, _ in self._stream()]

    def _stream(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers)
        for images, positions, _ in loader:
            yield images, positions

    def __iter__(self):
        """Yields image batches [B, 3, H, W] in the order of `rows`."""
        if self.cached is not None:
            yield from self.cached
        else:
            for images, _ in self._stream():
                yield images
