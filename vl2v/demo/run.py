"""`vl2v demo`: the whole job on real images, offline, on a CPU: Digits-DG, our small CLIP, a
pretrained student, Align, Distill and SWAD beside the ERM and KD baselines, a results table, a
figure and a report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vl2v import pipeline
from vl2v.cache import load_targets
from vl2v.config import TrainConfig
from vl2v.data import all_splits, scan_dataset
from vl2v.demo import report
from vl2v.demo.digits import build_digits_dg, write_sample_grid
from vl2v.demo.pretrain import PretrainRecipe, pretrain_demo_student, student_kwargs
from vl2v.demo.teacher import TeacherRecipe, train_demo_teacher
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.evaluate import teacher_zero_shot
from vl2v.methods import get_method
from vl2v.results import collect
from vl2v.runtime import Progress, barrier, launch

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
    methods: tuple[str, ...] = ("align", "distill", "erm", "kd")  # compared on the same data
    views: int = 8  # augmented views per image in the cache: every method trains on them
    trials: int = 1  # trial seeds 0..N-1, each another in/out split; the report shows their mean
    # Align trains a linear projection on cached features: its steps cost little, so it has more
    # of them, and fewer checkpoints (each saves the whole student).
    align_steps: int = 500
    align_lr: float = 3e-3
    align_checkpoint_freq: int = 100
    steps: int = 101  # Distill, ERM and KD alike: methods compare at equal training steps
    lr: float = 1e-3
    warmup_steps: int = 10  # chosen, as every setting here, by the training domains' validation accuracy
    checkpoint_freq: int = 25
    # One compute thread and one decoding worker: on two cores, two busy compute threads next to
    # anything else running slow each other down by an order of magnitude; and a fixed count keeps
    # the figures the same on machines with more cores.
    threads: int = 1
    workers: int = 1
    seed: int = 0

    def train_flags(self, method: str, weights: Path) -> dict:
        """A method's TrainConfig settings; `weights` is the pretrained student."""
        align = method == "align"
        steps, lr = (self.align_steps, self.align_lr) if align else (self.steps, self.lr)
        return {
            "student": self.student,
            "pretrained": True,
            "image_size": self.image_size,
            "model_kwargs": student_kwargs(weights.resolve()),
            "batch_size": self.batch_size,
            "steps": steps,
            "lr": lr,
            "warmup_steps": self.warmup_steps,
            "checkpoint_freq": self.align_checkpoint_freq if align else self.checkpoint_freq,
            "freeze_bn": self.freeze_bn,
            "workers": self.workers,
            "seed": self.seed,
            "eval_splits": "selection",  # the training domains' 'in' splits are never read: 2.5x fewer images per checkpoint
            "parallel": "domains",  # under torchrun: whole held-out domains per process, results as one process's
        }


QUICK = dict(
    per_class=6, teacher={"steps": 3, "n_synth": 40, "n_patches": 20, "batch_size": 16},
    student="test_resnet", pretrain={"glyphs": 60, "patches": 10, "steps": 2, "batch_size": 8},
    batch_size=4, align_steps=4, steps=4, checkpoint_freq=2, align_checkpoint_freq=2, workers=0,
)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict | None:
    """Build data, teacher and pretrained student (once each), embed, train every method for every
    held-out domain, report. Under torchrun the processes share the work out (the teacher and the
    student's pretraining side by side, then whole held-out domains) and rank 0 reports; every
    figure is the same as one process's. Returns the summary on rank 0, None on the others."""
    torch.set_num_threads(cfg.threads)
    me = launch()
    lead = me.rank == 0
    progress = progress if lead else None
    work, clock = Path(cfg.workdir), Clock()
    data_root = _first_on(0, partial(build_digits_dg, work / "data", cfg.per_class, cfg.seed, progress))
    if lead:
        write_sample_grid(data_root, work / "samples.png")
    clock.lap("data")
    # Independent jobs: the teacher on rank 0 and the student on rank 1, at once when there are two.
    teacher_job = partial(train_demo_teacher, work / "teacher", cfg.seed, progress, TeacherRecipe(**cfg.teacher))
    _first_on(0, teacher_job, wait=False)
    student = _first_on(1 % me.world_size, partial(pretrain_demo_student, work / "student", cfg.seed, progress, PretrainRecipe(student=cfg.student, **cfg.pretrain)))
    config_json, weights = teacher_job()  # trained by now: its paths
    teacher = f"{config_json}:{weights}"
    clock.lap("teacher and student")
    index = scan_dataset(data_root, progress=progress)
    cache_dir = pipeline.teacher_cache_dir(index.name, teacher)
    embed = EmbedConfig(teacher=teacher, workers=cfg.workers, batch_size=256, views=cfg.views)
    embedded = _first_on(0, partial(embed_dataset, index, cache_dir, embed, progress))
    clock.lap("embed")
    runs_root = work / "runs"
    experiment = pipeline.experiment_dir(data_root, cfg.student, runs_root)
    for trial in range(cfg.trials):  # DomainBed's trials: each its own in/out split
        for method in cfg.methods:  # the same splits, seeds, views and batches for every method
            run_dir = pipeline.method_run_dir(experiment, trial, method)
            start = get_method(method).starts_from
            from_run = pipeline.method_run_dir(experiment, trial, start) if start else None
            flags = {**cfg.train_flags(method, student), "trial_seed": trial}
            pipeline.train(data_root, TrainConfig(method=method, **flags), run_dir, cache_dir, teacher, from_run, progress)
    clock.lap("train")
    if not lead:
        return None
    targets = load_targets(cache_dir, index)
    # The teacher over the same trials as the methods' rows: every trial the runs folder holds.
    trials = sorted(int(p.name.removeprefix("trial")) for p in experiment.glob("trial*"))
    zero_shot = [teacher_zero_shot(targets, index, {d: s[f"env{i}_in"] for i, d in enumerate(index.domains)})
                 for s in (all_splits(index, trial_seed=t) for t in trials)]
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "teacher": teacher,
        "domains": index.domains,
        "images": len(index.good),
        "views": targets.manifest.get("views"),
        "trials": trials,
        "teacher_zero_shot": {d: float(np.mean([z[d] for z in zero_shot])) for d in index.domains},
        "results": collect(runs_root / index.name),
        "queries": targets.manifest["queries"],
        "embedded_now": embedded.embedded,
        "processes": me.world_size,
        "seconds": clock.laps,
    }
    out_dir = runs_root / index.name
    summary["figure"] = str(report.write_figure(summary, out_dir / "results.png"))
    summary["report"] = str(report.write_markdown(summary, out_dir / "report.md", work / "samples.png"))
    return summary


def _first_on(rank: int, job, wait: bool = True):
    """Run `job` on `rank`; with `wait`, the other processes then run it too, after a barrier,
    which finds its work done (every demo job skips what is already built) and returns its result."""
    result = job() if launch().rank == rank else None
    if wait:
        barrier()
        if result is None:
            result = job()
    return result


class Clock:
    """Seconds per phase."""

    def __init__(self):
        self.laps, self._tic = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._tic = round(now - self._tic, 1), now
