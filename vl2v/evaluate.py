"""Accuracies per domain and split: a run's models, an exported bundle, the teacher's zero-shot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vl2v import runs
from vl2v.batches import EvalImages
from vl2v.cache import Targets
from vl2v.data import DatasetIndex, build_eval_transform, scan_dataset
from vl2v.runtime import Progress, UserError, load_checkpoint, resolve_device
from vl2v.config import TrainConfig
from vl2v.methods import get_method

if TYPE_CHECKING:
    from vl2v.student import DataConfig


def teacher_zero_shot(targets: Targets, index: DatasetIndex, splits: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Zero-shot accuracy of the cached teacher embeddings against the cached class embeddings:
    per domain over all its usable images, or per split name when `splits` is given."""
    labels = torch.tensor([f.label for f in index.files])
    correct = (targets.image @ targets.text.T).argmax(dim=1) == labels
    valid = targets.valid.numpy()
    if splits is None:
        domains = np.array([f.domain for f in index.files])
        splits = {d: np.flatnonzero(domains == i) for i, d in enumerate(index.domains)}
    splits = {name: rows[valid[rows]] for name, rows in splits.items()}  # never-embedded rows are zeros
    return {name: float(correct[rows].float().mean()) if len(rows) else float("nan") for name, rows in splits.items()}


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches, device: torch.device, amp: torch.dtype | None = None) -> torch.Tensor:
    """Text-head logits [N, C] (float32, CPU) for image batches [B, 3, H, W] in order."""
    model.eval()
    logits = []
    for images in batches:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits.append(model(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(logits)


def load_student(run_info: dict, weights: Path, device: torch.device) -> tuple[torch.nn.Module, DataConfig]:
    """A trained student from its weights file; no download and no teacher: the head is in it."""
    from vl2v.student import build_student  # timm: not needed to evaluate a bundle

    cfg = TrainConfig(**run_info["config"])
    state = load_checkpoint(weights)
    method = get_method(cfg.method)
    text = state.get("head.classifier")  # a text head's buffer: the class embeddings × logit scale
    model, data_cfg = build_student(cfg, method.head, len(run_info["dataset"]["classes"]), text, 1.0, run_info["teacher"], pretrained=False)
    model.load_state_dict(state)
    return model.to(device), data_cfg


def evaluate_target(target: Path, dataset_root: Path | None = None, device: str = "auto", batch_size: int = 128, workers: int = 2,
                    progress: Progress | None = None) -> list[dict]:
    """`vl2v eval`: the rows of `evaluate_bundle` for a bundle folder, else of `evaluate_run`."""
    from vl2v.bundle import is_bundle

    evaluate = evaluate_bundle if is_bundle(target) else evaluate_run
    return evaluate(target, dataset_root, device, batch_size, workers, progress)


def evaluate_run(run_dir: Path, dataset_root: Path | None = None, device: str = "auto", batch_size: int = 128, workers: int = 2, progress: Progress | None = None) -> list[dict]:
    """Accuracy of every finished held-out domain's selected models ("best", "swad"), and of a
    deployment run's, on every domain of the run's dataset, or of another folder with the same
    classes. Rows: one per model."""
    info = runs.run_info(run_dir)
    index = _scan(dataset_root or info["dataset"]["root"], info["dataset"]["classes"], "the run was trained on", progress)
    dev = resolve_device(device)
    labels = torch.tensor([f.label for f in index.files])
    rows = []
    held_out_names = info["dataset"]["domains"]
    for env in [None, *range(len(held_out_names))]:
        held_out, env_path = runs.env_name(held_out_names, env), runs.env_dir(run_dir, env)
        if runs.read_final(env_path) is None:
            continue
        for name in ("best", "swad"):
            if not (env_path / f"{name}.pt").exists():
                continue
            model, data_cfg = load_student(info, env_path / f"{name}.pt", dev)
            images, good = _eval_images(index, data_cfg, batch_size, workers)
            correct = predict_logits(model, images, dev).argmax(1) == labels[good]
            domains = torch.tensor([index.files[i].domain for i in good])
            accs = {d: float(correct[domains == i].float().mean()) for i, d in enumerate(index.domains) if (domains == i).any()}
            rows.append({"held_out": held_out, "model": name, "accuracy": accs})
    if not rows:
        raise UserError(f"{run_dir} has no finished held-out domain yet; finish it with the command that started it.")
    return rows


def evaluate_bundle(bundle_dir: Path, dataset_root: Path | None = None, device: str = "auto", batch_size: int = 128, workers: int = 2,
                    progress: Progress | None = None) -> list[dict]:
    """Accuracy of an exported bundle (vl2v.bundle, as `vl2v predict` runs it) on every domain of
    a dataset with its classes; by default the dataset it was trained on. One row."""
    from vl2v.bundle import load_bundle, run_bundle

    bundle = load_bundle(bundle_dir, device)
    if dataset_root is None:
        dataset_root = Path(bundle.provenance["dataset"]["root"])
        if not dataset_root.is_dir():
            raise UserError(f"The bundle's training data {dataset_root} is gone; pass --data DIR (a folder with its classes).")
    index = _scan(dataset_root, bundle.classes, "the bundle predicts", progress)
    files = [index.files[i] for i in index.good]
    out = run_bundle(bundle, [index.root / f.path for f in files], batch_size, workers, progress)
    labels = np.array([files[r].label for r in out.rows])
    domains = np.array([files[r].domain for r in out.rows])
    correct = out.logits.argmax(1) == labels
    accs = {d: float(correct[domains == i].mean()) for i, d in enumerate(index.domains) if (domains == i).any()}
    return [{"held_out": bundle.provenance["held_out"], "model": bundle.label, "accuracy": accs}]


def _scan(root: Path, classes: list[str], whose: str, progress: Progress | None) -> DatasetIndex:
    index = scan_dataset(root, progress=progress)
    if index.classes != classes:
        raise UserError(f"{index.root} has classes {index.classes[:5]}…, {whose} {classes[:5]}…; they must be the same.")
    return index


def _eval_images(index: DatasetIndex, data_cfg: DataConfig, batch_size: int, workers: int) -> tuple[EvalImages, np.ndarray]:
    good = index.good
    transform = build_eval_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
    size = (3, data_cfg.image_size, data_cfg.image_size)
    return EvalImages(index.root, [f.path for f in index.files], good, transform, size, batch_size, workers), good
