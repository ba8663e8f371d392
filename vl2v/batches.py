"""Student-side data: seeded per-step training batches and preloaded evaluation images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl2v.data import ImageDataset, load_rgb
from vl2v.viewcache import ParamsFile
from vl2v.views import ViewParams, render_view

EVAL_PRELOAD_BYTES = 1 << 30  # evaluation images are decoded once and kept when they fit in this


@dataclass(frozen=True)
class StudentViews:
    """A cache's views as the student sees them: view k of dataset row r, with the parameters the
    teacher's view was rendered from, at the student's size with its normalisation."""

    count: int  # K views per image
    params: ParamsFile  # [N, K, N_PARAMS]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def render(self, image, row: int, k: int) -> torch.Tensor:
        """[3, size, size] float32."""
        return render_view(image, ViewParams.from_array(self.params.array[row, k]), self.size, self.mean, self.std)


class StepBatches(Dataset):
    """Item i is the batch of training step `start + i`: `batch_size` rows drawn with replacement
    from every training domain's "in" rows, concatenated in domain order, each augmented with its
    own seed, or (with `views`) shown as one of its cached views. A pure function of (seed, test
    env, step), so a resumed run sees the same batches whatever the number of workers, and DDP
    processes together see the batch of one process. Items: (images [B, 3, H, W], rows [B], views
    k [B], zeros without `views`)."""

    def __init__(self, root: Path, paths: list[str], domain_rows: list[np.ndarray], batch_size: int, transform, seed: tuple[int, ...], start: int, steps: int,
                 part: tuple[int, int] = (0, 1), views: StudentViews | None = None):
        self.root, self.paths, self.domain_rows = Path(root), paths, domain_rows
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.start, self.steps = start, steps
        self.part = part  # (rank, world size): this process's contiguous slice of every batch (DDP)
        self.views = views

    def __len__(self) -> int:
        return self.steps - self.start

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The dataset rows of a step's batch, their augmentation seeds and their views k. The views
        are drawn last, so that the rows and seeds are the same with views or without."""
        rng = np.random.default_rng([*self.seed, step])
        rows = np.concatenate([r[rng.integers(len(r), size=self.batch_size)] for r in self.domain_rows])
        seeds = rng.integers(2**62, size=len(rows))
        ks = rng.integers(self.views.count, size=len(rows)) if self.views else np.zeros(len(rows), dtype=np.int64)
        rank, world = self.part
        mine = slice(rank * (len(rows) // world), (rank + 1) * (len(rows) // world))
        return rows[mine], seeds[mine], ks[mine]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, seeds, ks = self.rows(self.start + i)
        images = []
        for row, seed, k in zip(rows, seeds, ks):
            image = load_rgb(self.root / self.paths[row])
            if self.views:
                images.append(self.views.render(image, int(row), int(k)))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                images.append(self.transform(image))
        return torch.stack(images), torch.from_numpy(rows), torch.from_numpy(ks)


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
