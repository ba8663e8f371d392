"""`vl2v demo`: the whole job on real images, offline, on a CPU: Digits-DG, our small CLIP, Align,
Distill, SWAD, the results table, a figure and a report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vl2v import pipeline
from vl2v.cache import load_targets
from vl2v.config import TrainConfig
from vl2v.data import all_splits, scan_dataset
from vl2v.demo import report
from vl2v.demo.digits import build_digits_dg, write_sample_grid
from vl2v.demo.teacher import TeacherRecipe, train_demo_teacher
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.evaluate import teacher_zero_shot
from vl2v.results import collect
from vl2v.runtime import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings. The student has no pretrained weights offline, so it trains from random
    init with a higher learning rate than the paper's 5e-5 (which assumes ImageNet weights)."""

    workdir: Path = Path("demo")
    per_class: int = 100  # images per class and domain: 4 domains × 10 classes × 100
    # A fixed number of steps, not a time budget, so the teacher is the same on any machine.
    teacher_steps: int = 500
    teacher_pool: dict = field(default_factory=dict)  # TeacherRecipe overrides (pool sizes)
    student: str = "resnet10t"
    # A random-init timm ResNet zero-initialises each block's last BatchNorm, which makes frozen
    # features nearly constant: Align would learn nothing.
    model_kwargs: dict = field(default_factory=lambda: {"zero_init_last": False})
    # BatchNorm trains (its statistics too): frozen BN suits pretrained students, and a random-init
    # one has no statistics worth keeping. SWAD then re-estimates them for its average.
    freeze_bn: bool = False
    image_size: int = 32
    batch_size: int = 32
    align_steps: int = 26
    align_lr: float = 1e-3
    distill_steps: int = 101
    distill_lr: float = 1e-3
    checkpoint_freq: int = 25
    # One compute thread and one decoding worker: on two cores, two busy compute threads next to
    # anything else running slow each other down by an order of magnitude.
    threads: int = 1
    workers: int = 1
    seed: int = 0

    def train_flags(self, stage: str) -> dict:
        steps, lr = (self.align_steps, self.align_lr) if stage == "align" else (self.distill_steps, self.distill_lr)
        return {
            "student": self.student,
            "pretrained": False,
            "image_size": self.image_size,
            "model_kwargs": self.model_kwargs,
            "batch_size": self.batch_size,
            "steps": steps,
            "lr": lr,
            "checkpoint_freq": self.checkpoint_freq,
            "freeze_bn": self.freeze_bn,
            "workers": self.workers,
            "seed": self.seed,
        }


QUICK = dict(
    per_class=6, teacher_steps=3, teacher_pool={"n_synth": 40, "n_patches": 20, "batch_size": 16},
    student="test_resnet", batch_size=4, align_steps=4, distill_steps=4, checkpoint_freq=2, workers=0,
)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict:
    """Build data and teacher (once), embed, Align and Distill every held-out domain, report."""
    torch.set_num_threads(cfg.threads)
    times, tic = {}, time.perf_counter()
    work = Path(cfg.workdir)
    data_root = build_digits_dg(work / "data", cfg.per_class, cfg.seed, progress)
    write_sample_grid(data_root, work / "samples.png")
    times["data"] = time.perf_counter() - tic
    recipe = TeacherRecipe(steps=cfg.teacher_steps, **cfg.teacher_pool)
    config_json, weights = train_demo_teacher(work / "teacher", seconds=0.0, seed=cfg.seed, progress=progress, recipe=recipe)
    teacher = f"{config_json}:{weights}"
    times["teacher"] = time.perf_counter() - tic - sum(times.values())
    index = scan_dataset(data_root, progress=progress)
    cache_dir = pipeline.teacher_cache_dir(index.name, teacher)
    embedded = embed_dataset(index, cache_dir, EmbedConfig(teacher=teacher, workers=cfg.workers, batch_size=256), progress)
    targets = load_targets(cache_dir, index)
    splits = all_splits(index, trial_seed=0)
    zero_shot = teacher_zero_shot(targets, index, {d: splits[f"env{i}_in"] for i, d in enumerate(index.domains)})
    times["embed"] = time.perf_counter() - tic - sum(times.values())
    runs_root = work / "runs"
    experiment = pipeline.experiment_dir(data_root, cfg.student, runs_root)
    for method in ("align", "distill"):
        run_dir = pipeline.method_run_dir(experiment, 0, method)
        from_run = pipeline.method_run_dir(experiment, 0, "align") if method == "distill" else None
        pipeline.train(data_root, TrainConfig(method=method, **cfg.train_flags(method)), run_dir, cache_dir, teacher, from_run, progress)
    times["train"] = time.perf_counter() - tic - sum(times.values())
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "teacher": teacher,
        "domains": index.domains,
        "images": len(index.good),
        "teacher_zero_shot": zero_shot,
        "results": collect(runs_root / index.name),
        "queries": targets.manifest["queries"],
        "embedded_now": embedded.embedded,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    out_dir = runs_root / index.name
    summary["figure"] = str(report.write_figure(summary, out_dir / "results.png"))
    summary["report"] = str(report.write_markdown(summary, out_dir / "report.md", work / "samples.png"))
    return summary
