"""The embed job: run the teacher (local or behind a server) once over every image and class prompt
into the cache, within a query budget."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vl2v import cache, viewcache
from vl2v.budget import BUDGETS, Plan, plan_queries
from vl2v.data import DatasetIndex
from vl2v.remote import RemoteTeacher
from vl2v.runtime import Progress, UserError, barrier, launch, resolve_device
from vl2v.shards import embed_in_shards
from vl2v.teacher import (
    DEFAULT_TEACHER,
    TeacherBackend,
    TeacherSpec,
    build_text_embeddings,
    check_weights_named,
    create_teacher,
    describe_identity,
    is_built_by,
    load_templates,
    parse_teacher_spec,
)

log = logging.getLogger(__name__)


LOCAL_SHARD_SIZE = 8192


@dataclass(frozen=True)
class EmbedConfig:
    teacher: str = DEFAULT_TEACHER  # a local open_clip spec, or http(s)://HOST:PORT of a teacher server
    prompts: str = "photo"  # a style of vl2v.teacher.TEMPLATES or a template file
    batch_size: int = 128  # images per forward pass (a remote teacher: per request)
    workers: int = min(4, os.cpu_count() or 1)
    device: str = "auto"
    precision: str = "fp32"
    store_dtype: str = "fp16"  # how image embeddings are stored: fp16 or fp32
    shard_size: int | None = None  # images per shard, a whole number of batches; None: 8192, remote: one request
    shard: tuple[int, int] = (1, 1)  # this process's part I of N
    max_queries: int | None = None  # the most queries (images + prompts) this run may pay for
    budget: str = "refuse"  # over max_queries: refuse, or embed a stratified subset that fits
    token: str | None = field(default=None, repr=False)  # a teacher server's; None: $VL2V_TEACHER_TOKEN
    in_flight: int = 4  # requests to a teacher server at once
    timeout: float = 300.0  # seconds per request to a teacher server
    retries: int = 5  # retries of a failed request
    views: int = 0  # augmented views per image to hold (the cache keeps the views it has, and their seed)
    view_seed: int | None = None  # the seed views are drawn from; None: the cache's, else 0

    def __post_init__(self):
        i, n = self.shard
        if not 1 <= i <= n:
            raise UserError(f"--shard {i}/{n}: I must be between 1 and N.")
        if self.store_dtype not in ("fp16", "fp32"):
            raise UserError(f"--store-dtype must be fp16 or fp32, not '{self.store_dtype}'.")
        if self.batch_size < 1 or (self.shard_size is not None and self.shard_size < self.batch_size):
            raise UserError("--batch-size must be ≥ 1 and --shard-size ≥ --batch-size.")
        if self.budget not in BUDGETS:
            raise UserError(f"--budget must be {' or '.join(BUDGETS)}, not '{self.budget}'.")
        if self.budget == "subset" and self.shard != (1, 1):
            raise UserError("--budget subset picks one subset of the whole dataset: run it without --shard and outside torchrun.")
        if self.in_flight < 1 or self.retries < 0 or self.timeout <= 0:
            raise UserError("--in-flight must be ≥ 1, --retries ≥ 0 and --timeout > 0.")
        if self.views < 0 or (self.view_seed is not None and self.view_seed < 0):
            raise UserError("--views and --view-seed must be ≥ 0.")

    def rows_per_shard(self, remote: bool) -> int:
        """A remote teacher's answers are written as they arrive: a kill loses only requests in flight."""
        return self.shard_size or (self.batch_size if remote else LOCAL_SHARD_SIZE)

    def view_batch(self, k: int) -> int:
        """Images per batch when each brings `k` views: `--batch-size` counts the teacher's inputs."""
        return max(1, self.batch_size // k)

    def view_rows_per_shard(self, remote: bool, k: int) -> int:
        """Images per view shard: about LOCAL_SHARD_SIZE views locally, a kill losing no more."""
        return self.shard_size or (self.view_batch(k) if remote else max(self.view_batch(k), LOCAL_SHARD_SIZE // k))


@dataclass
class EmbedReport:
    cache_dir: Path
    embedded: int  # images the teacher saw in this run
    reused: int  # images already in the cache
    failed: int  # images that did not decode (scan or embed)
    text_queries: int  # prompts the teacher saw in this run
    complete: bool  # manifest says complete: every part done (or the budget's subset)
    queries_total: dict  # everything ever paid for this cache folder
    plan: dict = field(default_factory=dict)  # what this run set out to pay (vl2v.budget.Plan)
    cost: dict = field(default_factory=dict)  # what this run paid: queries, requests, retries, bytes sent
    images_with_targets: int = 0  # usable images the cache has a teacher embedding for
    views: int = 0  # augmented views per image the cache holds (asks for, while incomplete)
    views_embedded: int = 0  # views the teacher embedded in this run


def _check_provenance(cache_dir: Path, spec: TeacherSpec, remote: RemoteTeacher | None) -> None:
    """Refuse a cache of another teacher (same model and weights, wherever they are, is the same)."""
    manifest = cache.read_manifest(cache_dir)
    if manifest is None:
        return
    prov = manifest["provenance"]
    if remote is None and not is_built_by(prov, spec):
        raise UserError(f"{cache_dir} holds embeddings of teacher {prov['teacher']}, not {spec}. Pass another --cache-dir, or delete that folder.")
    if remote is not None and prov.get("identity") != remote.identity():
        theirs = describe_identity(prov["identity"]) if prov.get("identity") else "no identity recorded"
        raise UserError(
            f"{cache_dir} holds embeddings of teacher {prov['teacher']} ({theirs}), not of the teacher at {spec} "
            f"({describe_identity(remote.identity())}). Pass another --cache-dir, or delete that folder."
        )


def embed_dataset(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, progress: Progress | None = None) -> EmbedReport:
    """Embed every image of `index` not yet in `cache_dir` (or the subset `--budget subset`
    allows), and the class prompts; resumable. The plan is logged before anything is paid. A second
    run of the same part waits for the first (`cache.part_lock`), then pays for what is left."""
    spec = parse_teacher_spec(cfg.teacher)
    cache_dir = Path(cache_dir)
    with contextlib.ExitStack() as stack:
        # a server is asked who it is now; a local teacher is built only if there is work for it
        teacher = stack.enter_context(RemoteTeacher(str(spec), cfg.token, cfg.timeout, cfg.retries, cfg.in_flight)) if spec.remote else None
        _check_provenance(cache_dir, spec, teacher)  # before waiting for a lock: a wrong teacher fails at once
        check_weights_named(spec)  # before the plan is shown
        created = next((d for d in [*reversed(cache_dir.absolute().parents), cache_dir.absolute()] if not d.exists()), None)
        cache_dir.mkdir(parents=True, exist_ok=True)  # the part's lock lives in it
        try:
            with cache.part_lock(cache_dir, cfg.shard):
                return _embed_part(index, cache_dir, cfg, spec, teacher, progress)
        except UserError:
            if created and not any(cache_dir.glob("*.h5")) and cache.read_manifest(cache_dir) is None:
                shutil.rmtree(created, ignore_errors=True)  # refused before paying (say, over budget): leave no folder
            raise


@dataclass
class _Work:
    """What one part's run found in the cache and is to pay for."""

    found: dict[int, cache.CachedRow]  # dataset rows with an image embedding
    failed: np.ndarray  # [N] bool: rows that failed to decode when embedded
    pending: list[int]  # rows to embed
    text_todo: bool
    views: int  # views per image the cache is to hold
    view_seed: int
    covered: np.ndarray  # [N] views 0..c-1 each row has
    view_todo: dict[range, list[int]]  # views to embed: {k range: rows}

    @property
    def view_queries(self) -> int:
        return sum(len(rows) * len(ks) for ks, rows in self.view_todo.items())


def _embed_part(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, spec: TeacherSpec, teacher: TeacherBackend | None,
                progress: Progress | None) -> EmbedReport:
    """`embed_dataset` under the part's lock: no live run of this part is left to race with."""
    _check_provenance(cache_dir, spec, teacher)  # again: the run waited for may have written the first manifest
    part = cfg.shard
    for stale in [*cache_dir.glob(cache.tmp_pattern(part)), *cache_dir.glob(viewcache.view_tmp_pattern(part))]:
        stale.unlink()  # a shard a killed run of this part left half-written
    templates = load_templates(cfg.prompts)
    work, plan = _plan(index, cache_dir, cfg, spec, templates)
    if plan.queries:
        log.info("%s", plan)
    if teacher is None and (work.pending or work.view_todo or work.text_todo or cache.read_manifest(cache_dir) is None):
        teacher = create_teacher(spec, resolve_device(cfg.device))
    if teacher is not None:
        with cache.manifest_lock(cache_dir):
            views = viewcache.views_section(cache_dir, work.views, work.view_seed, work.covered, _usable(index, work.failed))
            _write_manifest(cache_dir, index, _provenance(teacher, templates, cfg), False, work.found, work.failed, views)
    if (work.pending or work.view_todo) and not spec.remote:
        progress = _with_estimate(progress, teacher.device, len(work.pending) + work.view_queries, work.view_queries)
    text_queries, n_failed, views_embedded = _pay(index, cache_dir, teacher, templates, work, cfg, progress)
    report = _finish(index, cache_dir, cfg, teacher, templates, work, n_failed, text_queries)
    return replace(report, plan={**asdict(plan), "queries": plan.queries}, cost=teacher.cost() if teacher else {}, views_embedded=views_embedded)


def _plan(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, spec: TeacherSpec, templates: list[str]) -> tuple[_Work, Plan]:
    """Match the cache (read under the part's lock: what a holder wrote counts) and plan what this
    part pays for: images, their views, prompts, within the budget."""
    part = cfg.shard
    found, failed = cache.match_rows(index, cache_dir)
    cache.record_new_times(index, cache_dir, found, part, cfg.rows_per_shard(spec.remote))
    count, seed = _view_settings(cache_dir, cfg)
    view_rows = viewcache.match_views(index, cache_dir) if count else {}
    if viewcache.record_new_view_times(index, cache_dir, view_rows, part, cfg.view_rows_per_shard(spec.remote, max(count, 1))):
        view_rows = viewcache.match_views(index, cache_dir)
    covered = viewcache.views_covered(view_rows, len(index.files))
    mine = [int(r) for r in index.good if r % part[1] == part[0] - 1]
    pending = [r for r in mine if r not in found]
    lacking = {r: count - int(covered[r]) for r in mine if not failed[r] and covered[r] < count}
    text = cache.read_text(cache_dir)
    text_todo = part[0] == 1 and (text is None or text["classes"] != index.classnames or text["templates"] != templates)
    prompts = len(index.classnames) * len(templates) if text_todo else 0
    plan, pending, view_rows_todo = plan_queries(index, pending, prompts, len(found), cfg.max_queries, cfg.budget, lacking)
    todo = viewcache.pending_views(covered, view_rows_todo, count)
    return _Work(found, failed, pending, text_todo, count, seed, covered, todo), plan


def _view_settings(cache_dir: Path, cfg: EmbedConfig) -> tuple[int, int]:
    """Views per image the cache is to hold (it never drops views it has) and their seed, which a
    cache with views keeps: another `--view-seed` is refused before anything is paid."""
    section = (cache.read_manifest(cache_dir) or {}).get("views") or {}
    stored = viewcache.stored_view_seed(cache_dir)
    if stored is None and section.get("count"):
        stored = int(section["seed"])  # asked for views, none written yet
    if cfg.view_seed is not None and stored is not None and cfg.view_seed != stored:
        raise UserError(f"{cache_dir} holds views drawn with --view-seed {stored}, not {cfg.view_seed}: leave --view-seed out (or pass {stored}), or pass another --cache-dir.")
    return max(cfg.views, int(section.get("count", 0))), stored if stored is not None else (cfg.view_seed or 0)


def _usable(index: DatasetIndex, failed: np.ndarray) -> np.ndarray:
    """Rows that are images and did not fail to decode when embedded."""
    return np.array([int(r) for r in index.good if not failed[r]], dtype=np.int64)


def _pay(index: DatasetIndex, cache_dir: Path, teacher: TeacherBackend | None, templates: list[str], work: _Work, cfg: EmbedConfig,
         progress: Progress | None) -> tuple[int, int, int]:
    """The text prompts, then the images, then their views; this part's cost file follows every
    shard written. Returns (prompts embedded, images that failed to decode, views embedded)."""
    if teacher is None:
        return 0, 0, 0
    earlier = cache.read_cost(cache_dir, cfg.shard)

    def record_cost() -> None:
        cache.write_cost(cache_dir, cfg.shard, cache.add_costs(earlier, teacher.cost()))

    total = len(work.pending) + work.view_queries
    try:
        text_queries = 0
        if work.text_todo:
            per_template, class_emb = build_text_embeddings(teacher, index.classnames, templates)
            cache.write_text(cache_dir, index.classnames, templates, per_template, class_emb, teacher.logit_scale)
            text_queries = len(index.classnames) * len(templates)
        n_failed = _embed_images(index, cache_dir, teacher, work.pending, cfg, _counting(progress, 0, 1, total), record_cost) if work.pending else 0
        done, views = len(work.pending), 0
        for ks, rows in work.view_todo.items():
            lost = _embed_views(index, cache_dir, teacher, rows, ks, work.view_seed, cfg, _counting(progress, done, len(ks), total), record_cost)
            done += len(rows) * len(ks)
            views += (len(rows) - lost) * len(ks)
    finally:
        record_cost()
    return text_queries, n_failed, views


def _counting(progress: Progress | None, start: int, per: int, total: int) -> Progress | None:
    """A phase's (images done, images) as (teacher inputs done, all of this run's), each image `per` inputs."""
    return None if progress is None else lambda done, n: progress(start + done * per, total)


def embed_all_parts(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, progress: Progress | None = None) -> EmbedReport:
    """`embed_dataset`; under torchrun, each process embeds part RANK+1 of WORLD_SIZE, then, once
    all are done, every process completes the manifest (nothing is left to embed by then)."""
    me = launch()
    if not me.distributed:
        return embed_dataset(index, cache_dir, cfg, progress)
    mine = embed_dataset(index, cache_dir, replace(cfg, shard=(me.rank + 1, me.world_size)), progress)
    barrier()
    return replace(embed_dataset(index, cache_dir, replace(cfg, shard=(1, 1))), embedded=mine.embedded, text_queries=mine.text_queries)


def _provenance(teacher: TeacherBackend, templates: list[str], cfg: EmbedConfig) -> dict:
    return {**teacher.provenance(), "templates": templates, "prompts": cfg.prompts, "store_dtype": cfg.store_dtype}


def _embed_images(index: DatasetIndex, cache_dir: Path, teacher: TeacherBackend, pending: list[int], cfg: EmbedConfig, progress: Progress | None, on_shard) -> int:
    """Embed `pending` rows into image shards; returns how many failed to decode."""
    store = np.float16 if cfg.store_dtype == "fp16" else np.float32
    k = cache.next_shard_number(cache_dir, cfg.shard)

    def answers(paths):
        for b, emb, ok in teacher.encode_image_files(index.root, paths, cfg.workers, cfg.precision):
            yield b, {"embedding": emb.astype(store)}, ok

    def write(rows: np.ndarray, arrays: dict, ok: np.ndarray) -> None:
        nonlocal k
        cache.write_shard(cache_dir / cache.shard_name(k, cfg.shard), index, rows, arrays["embedding"], ok)
        k += 1
        on_shard()

    size = cfg.rows_per_shard(parse_teacher_spec(cfg.teacher).remote)
    return embed_in_shards([f.path for f in index.files], pending, cfg.batch_size, size, answers, write, progress)


def _embed_views(index: DatasetIndex, cache_dir: Path, teacher: TeacherBackend, rows: list[int], ks: range, seed: int, cfg: EmbedConfig,
                 progress: Progress | None, on_shard) -> int:
    """Embed views `ks` of `rows` into view shards; returns how many images failed to decode."""
    store = np.float16 if cfg.store_dtype == "fp16" else np.float32
    k = viewcache.next_view_shard_number(cache_dir, ks, cfg.shard)

    def answers(paths):
        for b, emb, ok, params in teacher.encode_view_files(index.root, paths, ks, seed, cfg.workers, cfg.precision):
            yield b, {"embedding": emb.astype(store), "params": params}, ok

    def write(shard_rows: np.ndarray, arrays: dict, ok: np.ndarray) -> None:
        nonlocal k
        path = cache_dir / viewcache.view_shard_name(ks, k, cfg.shard)
        viewcache.write_view_shard(path, index, shard_rows, arrays["embedding"], arrays["params"], ok, ks, seed)
        k += 1
        on_shard()

    size = cfg.view_rows_per_shard(parse_teacher_spec(cfg.teacher).remote, len(ks))
    return embed_in_shards([f.path for f in index.files], rows, cfg.view_batch(len(ks)), size, answers, write, progress)


def _write_manifest(cache_dir: Path, index: DatasetIndex, provenance: dict, complete: bool, found: dict, failed: np.ndarray, views: dict) -> None:
    """The manifest with the cost ledger, how many usable images have a target, whether a complete
    cache holds only a subset (`--budget subset`), and its views. Call it under `cache.manifest_lock`."""
    with_targets = sum(int(r) in found and not failed[r] for r in index.good)
    missing = sum(int(r) not in found for r in index.good)
    cache.write_manifest(
        cache_dir, index, provenance, complete=complete, queries=cache.count_queries(cache_dir),
        cost=cache.total_cost(cache_dir), images_with_targets=with_targets, subset=complete and missing > 0, views=views,
    )


def _finish(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, teacher: TeacherBackend | None, templates: list[str], work: _Work,
            n_failed: int, text_queries: int) -> EmbedReport:
    """Write the manifest; it is complete once every part's images with their views (or the
    budget's subset, all embedded by now) and the text are in."""
    with cache.manifest_lock(cache_dir):  # the last of parts finishing together sees every shard
        found_now, failed_now = cache.match_rows(index, cache_dir)
        covered = viewcache.views_covered(viewcache.match_views(index, cache_dir) if work.views else {}, len(index.files))
        usable = _usable(index, failed_now)
        text = cache.read_text(cache_dir)
        images_in = cfg.budget == "subset" or all(int(r) in found_now for r in index.good)
        views_in = cfg.budget == "subset" or bool((covered[usable] >= work.views).all())
        complete = images_in and views_in and text is not None and text["classes"] == index.classnames
        provenance = _provenance(teacher, templates, cfg) if teacher else cache.read_manifest(cache_dir)["provenance"]
        views = viewcache.views_section(cache_dir, work.views, work.view_seed, covered, usable)
        _write_manifest(cache_dir, index, provenance, complete, found_now, failed_now, views)
        manifest = cache.read_manifest(cache_dir)
    return EmbedReport(
        cache_dir=cache_dir,
        embedded=len(work.pending) - n_failed,
        reused=len(work.found),
        failed=len(index.bad) + int(failed_now.sum()),
        text_queries=text_queries,
        complete=complete,
        queries_total=manifest["queries"],
        images_with_targets=manifest["images_with_targets"],
        views=work.views,
    )


# A CPU embed expected to take longer than this says so, with its estimate, after the first batch.
LONG_CPU_EMBED_S = 60.0


def _with_estimate(progress: Progress | None, device: torch.device, total: int, views: int = 0) -> Progress:
    """`progress`, plus one log line after the first batch of a long CPU embed: the throughput
    measured on that batch (worker start-up included, so rather pessimistic) and the time it implies."""
    started, told = time.monotonic(), False

    def update(done: int, n: int) -> None:
        nonlocal told
        if not told:
            told = True
            rate = done / max(time.monotonic() - started, 1e-6)
            if device.type == "cpu" and total / rate >= LONG_CPU_EMBED_S:
                log.warning("%s", estimate_line(total, rate, device, views))
        if progress:
            progress(done, n)

    return update


def estimate_line(total: int, rate: float, device: torch.device, views: int = 0) -> str:
    """'embedding 24,788 images on cpu: about 2.0 h at 3.4 img/s; ...' for `rate` images/s; `total`
    counts teacher inputs, `views` of them augmented views."""
    seconds = total / rate
    if seconds >= 5400:
        took = f"{seconds / 3600:.1f} h"
    elif seconds >= 90:
        took = f"{seconds / 60:.0f} min"
    else:
        took = f"{seconds:.0f} s"
    what = f"{total - views:,} images + {views:,} views" if views else f"{total:,} images"
    return (
        f"embedding {what} on {device}: about {took} at {rate:.1f} img/s (measured on the first "
        "batch); use a GPU (--device cuda) or split the work across machines with --shard I/N"
    )
