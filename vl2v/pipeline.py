"""The stages chained: default folders, Distill from its Align run, the whole pipeline in one call."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vl2v import runs
from vl2v.cache import default_cache_dir, load_dataset_targets, read_manifest
from vl2v.config import resolve_config
from vl2v.data import domainbed_info, scan_dataset
from vl2v.embed import EmbedConfig, embed_all_parts
from vl2v.evaluate import teacher_zero_shot
from vl2v.results import collect
from vl2v.runtime import Progress, UserError
from vl2v.student import resolve_student_name
from vl2v.teacher import parse_teacher_spec
from vl2v.train import train_run

# Settings a Distill run takes from its Align run: they fix the model and the splits.
INHERITED = ("student", "pretrained", "image_size", "model_kwargs", "holdout", "trial_seed")


def cache_root() -> Path:
    return Path(os.environ.get("VL2V_CACHE", "cache"))


def teacher_cache_dir(dataset_name: str, teacher: str) -> Path:
    return default_cache_dir(cache_root(), dataset_name, parse_teacher_spec(teacher).slug)


def default_run_dir(runs_root: Path, dataset: str, student: str, trial_seed: int, stage: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", resolve_student_name(student))
    return Path(runs_root) / dataset / slug / f"trial{trial_seed}" / stage


def align(root: Path, flags: dict, config_file: Path | None = None, run_dir: Path | None = None, cache_dir: Path | None = None,
          teacher: str = "ViT-B-16-quickgelu:openai", progress: Progress | None = None, runs_root: Path = Path("runs")) -> tuple[Path, dict]:
    """Stage 1 for every held-out domain. Returns the run directory and its final records."""
    index = scan_dataset(root, check_images=False)
    cfg = resolve_config(index.info, config_file, {**flags, "stage": "align"})
    cache_dir = cache_dir or teacher_cache_dir(index.name, teacher)
    run_dir = run_dir or default_run_dir(runs_root, index.name, cfg.student, cfg.trial_seed, "align")
    return run_dir, train_run(index.root, cache_dir, cfg, run_dir, progress=progress)


def distill(from_run: Path, flags: dict, config_file: Path | None = None, run_dir: Path | None = None, progress: Progress | None = None) -> tuple[Path, dict]:
    """Stage 2 from each held-out domain's best Align model, with the Align run's model and splits."""
    info = runs.run_info(from_run)
    if info["config"]["stage"] != "align":
        raise UserError(f"--from {from_run} is a {info['config']['stage']} run; Distill starts from an Align run.")
    inherited = {k: info["config"][k] for k in INHERITED}
    test_envs = flags.get("test_envs") or tuple(info["config"]["test_envs"])
    given = {**flags, **inherited, "stage": "distill", "test_envs": test_envs}
    cfg = resolve_config(domainbed_info(info["dataset"]["name"]), config_file, given)
    domains = info["dataset"]["domains"]
    for name in cfg.test_envs or domains:
        env = domains.index(name) if name in domains else None
        if env is None or runs.read_final(runs.env_dir(from_run, env)) is None:
            raise UserError(f"Align run {from_run} has no finished model for held-out domain '{name}'. Finish it first: vl2v align ... --run-dir {from_run}")
    run_dir = run_dir or Path(from_run).with_name("distill" if Path(from_run).name == "align" else f"{Path(from_run).name}-distill")
    return run_dir, train_run(Path(info["dataset"]["root"]), Path(info["cache_dir"]), cfg, run_dir, from_run=Path(from_run), progress=progress)


def run_all(root: Path, flags: dict, config_file: Path | None, cache_dir: Path | None, teacher: str, prompts: str, trials: int,
            runs_root: Path, progress: Progress | None = None) -> list[dict]:
    """Embed if needed, then Align and Distill over every held-out domain for each trial seed.
    Returns the result rows of this student on this dataset."""
    if trials < 1:
        raise UserError(f"--trials must be ≥ 1, not {trials}.")
    index = scan_dataset(root, progress=progress)
    cache_dir = cache_dir or teacher_cache_dir(index.name, teacher)
    workers = flags.get("workers")  # 0 (decode in this process) is a choice, not "not given"
    embed_cfg = EmbedConfig(teacher=teacher, prompts=prompts, device=flags.get("device") or "auto", workers=EmbedConfig.workers if workers is None else workers)
    embed_all_parts(index, cache_dir, embed_cfg, progress=progress)
    student = None
    for trial in range(trials):
        align_dir, _ = align(index.root, {**flags, "trial_seed": trial}, config_file, None, cache_dir, teacher, progress, runs_root)
        distill(align_dir, flags, config_file, None, progress)
        student = runs.run_info(align_dir)["config"]["student"]
    return [row for row in collect(Path(runs_root) / index.name) if row["student"] == student]


def teacher_accuracy(target: Path, cache_dir: Path | None = None) -> dict[str, float]:
    """Zero-shot accuracy per domain from the cache of a run directory or of a dataset folder."""
    if (Path(target) / runs.CONFIG).exists():
        info = runs.run_info(target)
        root, cache_dir = Path(info["dataset"]["root"]), cache_dir or Path(info["cache_dir"])
    else:
        root = Path(target)
        cache_dir = cache_dir or _only_cache(root)
    index, targets = load_dataset_targets(root, cache_dir)
    return teacher_zero_shot(targets, index)


def _only_cache(root: Path) -> Path:
    folder = cache_root() / Path(root).resolve().name
    found = sorted(p for p in folder.glob("*") if read_manifest(p) is not None) if folder.is_dir() else []
    if len(found) != 1:
        what = f"several ({', '.join(p.name for p in found)})" if found else "none"
        raise UserError(f"Teacher caches for {root} under {folder}: {what}. Pass --cache-dir, or build one with `vl2v embed {root}`.")
    return found[0]
