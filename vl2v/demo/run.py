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
from vl2v.data import all_splits, scan_dataset
from vl2v.demo import report
from vl2v.demo.digits import build_digits_dg, write_sample_grid
from vl2v.demo.pretrain import PretrainRecipe, pretrain_demo_student, student_kwargs
from vl2v.demo.teacher import TeacherRecipe, train_demo_teacher
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.evaluate import teacher_zero_shot
from vl2v.results import collect
from vl2v.runtime import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings. The student starts from weights pretrained once on a glyph task of its
    own (`vl2v.demo.pretrain`), as the paper's students start from ImageNet weights."""

    workdir: Path = Path("demo")
    per_class: int = 100  # images per class and domain: 4 domains × 10 classes × 100
    teacher: dict = field(default_factory=dict)  # TeacherRecipe overrides
    student: str = "resnet10t"
    pretrain: dict = field(default_factory=dict)  # PretrainRecipe overrides
    freeze_bn: bool = True  # the paper's: BatchNorm keeps the pretrained statistics
    image_size: int = 32
    batch_size: int = 32
    align_steps: int = 26
    align_lr: float = 1e-3
    distill_steps: int = 101
    distill_lr: float = 1e-3
    checkpoint_freq: int = 25
    # One compute thread and one decoding worker: on two cores, two busy compute threads next to
    # anything else running slow each other down by an order of magnitude; and a fixed count keeps
    # the figures the same on machines with more cores.
    threads: int = 1
    workers: int = 1
    seed: int = 0

    def train_flags(self, stage: str, weights: Path) -> dict:
        """`vl2v align` / `vl2v distill` settings; `weights` is the pretrained student."""
        steps, lr = (self.align_steps, self.align_lr) if stage == "align" else (self.distill_steps, self.distill_lr)
        return {
            "student": self.student,
            "pretrained": True,
            "image_size": self.image_size,
            "model_kwargs": student_kwargs(weights.resolve()),
            "batch_size": self.batch_size,
            "steps": steps,
            "lr": lr,
            "checkpoint_freq": self.checkpoint_freq,
            "freeze_bn": self.freeze_bn,
            "workers": self.workers,
            "seed": self.seed,
        }


QUICK = dict(
    per_class=6, teacher={"steps": 3, "n_synth": 40, "n_patches": 20, "batch_size": 16},
    student="test_resnet", pretrain={"glyphs": 60, "patches": 10, "steps": 2, "batch_size": 8},
    batch_size=4, align_steps=4, distill_steps=4, checkpoint_freq=2, workers=0,
)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict:
    """Build data, teacher and pretrained student (once each), embed, Align and Distill every
    held-out domain, report."""
    torch.set_num_threads(cfg.threads)
    times, tic = {}, time.perf_counter()
    work = Path(cfg.workdir)
    data_root = build_digits_dg(work / "data", cfg.per_class, cfg.seed, progress)
    write_sample_grid(data_root, work / "samples.png")
    times["data"] = time.perf_counter() - tic
    config_json, weights = train_demo_teacher(work / "teacher", cfg.seed, progress, TeacherRecipe(**cfg.teacher))
    teacher = f"{config_json}:{weights}"
    times["teacher"] = time.perf_counter() - tic - sum(times.values())
    student = pretrain_demo_student(work / "student", cfg.seed, progress, PretrainRecipe(student=cfg.student, **cfg.pretrain))
    times["student"] = time.perf_counter() - tic - sum(times.values())
    index = scan_dataset(data_root, progress=progress)
    cache_dir = pipeline.teacher_cache_dir(index.name, teacher)
    embedded = embed_dataset(index, cache_dir, EmbedConfig(teacher=teacher, workers=cfg.workers, batch_size=256), progress)
    targets = load_targets(cache_dir, index)
    splits = all_splits(index, trial_seed=0)
    zero_shot = teacher_zero_shot(targets, index, {d: splits[f"env{i}_in"] for i, d in enumerate(index.domains)})
    times["embed"] = time.perf_counter() - tic - sum(times.values())
    runs_root = work / "runs"
    align_dir, _ = pipeline.align(data_root, cfg.train_flags("align", student), cache_dir=cache_dir, teacher=teacher, progress=progress, runs_root=runs_root)
    pipeline.distill(align_dir, cfg.train_flags("distill", student), progress=progress)
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
