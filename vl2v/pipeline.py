"""Methods chained over a dataset: default folders, a run continuing another, the comparison of
several methods on the same splits, seeds and batches."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path

from vl2v import runs
from vl2v.config import DEFAULT_TEACHER, INHERITED, TrainConfig
from vl2v.methods import expand_methods, get_method
from vl2v.runtime import Progress, UserError



def cache_root() -> Path:
    return Path(os.environ.get("VL2V_CACHE", "cache"))


def teacher_cache_dir(dataset_name: str, teacher: str) -> Path:
    from vl2v.cache import default_cache_dir
    from vl2v.teacher import parse_teacher_spec

    return default_cache_dir(cache_root(), dataset_name, parse_teacher_spec(teacher).slug)


def student_slug(student: str) -> str:
    from vl2v.student import TEACHER_STUDENT, resolve_student_name

    name = student if student == TEACHER_STUDENT else resolve_student_name(student)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def experiment_dir(dataset_root: Path, student: str, base: Path = Path("runs")) -> Path:
    """Where `vl2v run` puts its method runs by default: runs/<dataset>/<student>."""
    return Path(base) / Path(dataset_root).resolve().name / student_slug(student)


def method_run_dir(experiment: Path, trial_seed: int, method: str) -> Path:
    return Path(experiment) / f"trial{trial_seed}" / method


def train(root: Path | None, cfg: TrainConfig, run_dir: Path | None = None, cache_dir: Path | None = None,
          teacher: str = DEFAULT_TEACHER, from_run: Path | None = None, progress: Progress | None = None) -> tuple[Path, dict]:
    """Train `cfg.method` on every held-out domain of `root` (a continuing method: of `from_run`'s
    dataset, with its model and splits). Returns the run directory and its final records."""
    from vl2v.train import train_run

    method = get_method(cfg.method)
    if method.starts_from:
        root, cache_dir, cfg = _continue(from_run, cfg, method.starts_from)
        run_dir = run_dir or Path(from_run).with_name(method.name if Path(from_run).name == method.starts_from else f"{Path(from_run).name}-{method.name}")
    elif root is None:
        raise UserError(f"Method {method.name} trains on a dataset: pass ROOT.")
    if method.needs_cache and cache_dir is None:
        cache_dir = teacher_cache_dir(Path(root).resolve().name, teacher)
    run_dir = run_dir or method_run_dir(experiment_dir(root, cfg.student), cfg.trial_seed, method.name)
    return run_dir, train_run(Path(root), cache_dir, cfg, run_dir, from_run=from_run, teacher=teacher if cache_dir is None else None, progress=progress)


def _continue(from_run: Path | None, cfg: TrainConfig, start: str) -> tuple[Path, Path | None, TrainConfig]:
    """Dataset, cache and settings of a run continuing `from_run`, which must be a finished `start` run."""
    if from_run is None:
        raise UserError(f"Method {cfg.method} starts from a run of method '{start}': pass --from RUN_DIR.")
    info = runs.run_info(from_run)
    if info["config"]["method"] != start:
        raise UserError(f"--from {from_run} is a {info['config']['method']} run; {cfg.method} starts from a run of method '{start}'.")
    test_envs = cfg.test_envs or tuple(info["config"]["test_envs"])
    cfg = dataclasses.replace(cfg, **{k: info["config"][k] for k in INHERITED}, test_envs=test_envs)
    domains = info["dataset"]["domains"]
    names = ["none"] if cfg.deploy else (cfg.test_envs or domains)
    for name in names:
        env = None if cfg.deploy else (domains.index(name) if name in domains else -1)
        if env == -1 or runs.read_final(runs.env_dir(from_run, env)) is None:
            raise UserError(f"{start} run {from_run} has no finished model for held-out domain '{name}'. Finish it first: vl2v {start} ... --run-dir {from_run}")
    cache_dir = Path(info["cache_dir"]) if info["cache_dir"] else None
    return Path(info["dataset"]["root"]), cache_dir, cfg


def run_all(root: Path, cfg: TrainConfig, methods: list[str], trials: int = 1, experiment: Path | None = None,
            cache_dir: Path | None = None, teacher: str = DEFAULT_TEACHER, prompts: str = "photo",
            progress: Progress | None = None) -> list[dict]:
    """Embed if a method needs the teacher, then train every method for each trial seed on the same
    splits, seeds and batches. Returns the comparison rows: the teacher's zero-shot (when a cache was
    used), then each method's."""
    from vl2v.cache import read_manifest, view_count
    from vl2v.data import scan_dataset
    from vl2v.results import collect

    if trials < 1:
        raise UserError(f"--trials must be ≥ 1, not {trials}.")
    order = expand_methods(methods)
    experiment = experiment or experiment_dir(root, cfg.student)
    index = scan_dataset(root, progress=progress)
    if any(get_method(m).needs_cache for m in order):
        cache_dir = embed_for_training(index, cache_dir, teacher, prompts, cfg, progress)
    views = cache_dir is not None and cfg.views == "auto" and view_count(read_manifest(cache_dir)) > 0
    for trial in range(trials):
        for m in order:
            start = get_method(m).starts_from
            from_run = method_run_dir(experiment, trial, start) if start else None
            mcfg = dataclasses.replace(cfg, method=m, trial_seed=trial)
            uses_cache = get_method(m).needs_cache or views  # with views, every method trains on the same cached views
            train(index.root, mcfg, method_run_dir(experiment, trial, m), cache_dir if uses_cache else None, teacher, from_run, progress)
    rows = collect(experiment)
    return ([teacher_row(index, cache_dir, cfg, trials)] if cache_dir else []) + rows


def embed_for_training(index, cache_dir: Path | None, teacher: str, prompts: str, cfg: TrainConfig, progress: Progress | None) -> Path:
    """The teacher cache of `index`, embedding what is missing. A complete cache that matches the
    dataset is used as it is: the teacher (its weights, its server) is not needed then."""
    from vl2v.cache import load_targets
    from vl2v.embed import EmbedConfig, embed_all_parts
    from vl2v.teacher import load_templates

    cache_dir = cache_dir or teacher_cache_dir(index.name, teacher)
    with contextlib.suppress(UserError):
        manifest = load_targets(cache_dir, index).manifest
        if manifest["provenance"].get("templates") == load_templates(prompts):
            return cache_dir
    embed_cfg = EmbedConfig(teacher=teacher, prompts=prompts, device=cfg.device, workers=cfg.workers)
    embed_all_parts(index, cache_dir, embed_cfg, progress=progress)
    return cache_dir


def teacher_row(index, cache_dir: Path, cfg: TrainConfig, trials: int) -> dict:
    """The teacher's zero-shot accuracy on each held-out domain's "in" split, per trial seed."""
    from vl2v.cache import load_targets
    from vl2v.data import all_splits
    from vl2v.evaluate import teacher_zero_shot
    from vl2v.results import teacher_row as row

    targets = load_targets(cache_dir, index)
    held_out = [d for d in index.domains if not cfg.test_envs or d in cfg.test_envs]  # the methods' columns
    per_domain: dict[str, list[float]] = {d: [] for d in held_out}
    for trial in range(trials):
        splits = all_splits(index, trial, cfg.holdout)
        accs = teacher_zero_shot(targets, index, {d: splits[f"env{index.domains.index(d)}_in"] for d in held_out})
        for d, acc in accs.items():
            per_domain[d].append(acc)
    return row(index.name, index.domains, per_domain)


def teacher_accuracy(target: Path, cache_dir: Path | None = None) -> dict[str, float]:
    """Zero-shot accuracy per domain from the cache of a run directory or of a dataset folder."""
    from vl2v.cache import load_dataset_targets
    from vl2v.evaluate import teacher_zero_shot

    if (Path(target) / runs.CONFIG).exists():
        info = runs.run_info(target)
        if not info["cache_dir"] and cache_dir is None:
            raise UserError(f"{target} trained without a teacher cache ({info['config']['method']}); pass --cache-dir.")
        root, cache_dir = Path(info["dataset"]["root"]), cache_dir or Path(info["cache_dir"])
    else:
        root = Path(target)
        cache_dir = cache_dir or _only_cache(root)
    index, targets = load_dataset_targets(root, cache_dir)
    return teacher_zero_shot(targets, index)


def _only_cache(root: Path) -> Path:
    from vl2v.cache import read_manifest

    folder = cache_root() / Path(root).resolve().name
    found = sorted(p for p in folder.glob("*") if read_manifest(p) is not None) if folder.is_dir() else []
    if len(found) != 1:
        what = f"several ({', '.join(p.name for p in found)})" if found else "none"
        raise UserError(f"Teacher caches for {root} under {folder}: {what}. Pass --cache-dir, or build one with `vl2v embed {root}`.")
    return found[0]
