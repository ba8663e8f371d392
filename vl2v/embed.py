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

from vl2v import cache
from vl2v.budget import BUDGETS, plan_queries
from vl2v.data import DatasetIndex
from vl2v.remote import RemoteTeacher
from vl2v.runtime import Progress, UserError, barrier, launch, resolve_device
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

    def rows_per_shard(self, remote: bool) -> int:
        """A remote teacher's answers are written as they arrive: a kill loses only requests in flight."""
        return self.shard_size or (self.batch_size if remote else LOCAL_SHARD_SIZE)


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


def _embed_part(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, spec: TeacherSpec, teacher: TeacherBackend | None,
                progress: Progress | None) -> EmbedReport:
    """`embed_dataset` under the part's lock: no live run of this part is left to race with."""
    _check_provenance(cache_dir, spec, teacher)  # again: the run waited for may have written the first manifest
    part = cfg.shard
    for stale in cache_dir.glob(cache.tmp_pattern(part)):
        stale.unlink()  # a shard a killed run of this part left half-written
    templates = load_templates(cfg.prompts)
    found, failed = cache.match_rows(index, cache_dir)  # read under the lock: what a holder wrote counts
    cache.record_new_times(index, cache_dir, found, part, cfg.rows_per_shard(spec.remote))
    pending = [int(r) for r in index.good if r not in found and r % part[1] == part[0] - 1]
    text = cache.read_text(cache_dir)
    text_todo = part[0] == 1 and (text is None or text["classes"] != index.classnames or text["templates"] != templates)
    prompts = len(index.classnames) * len(templates) if text_todo else 0
    plan, pending = plan_queries(index, pending, prompts, len(found), cfg.max_queries, cfg.budget)
    if plan.queries:
        log.info("%s", plan)
    if teacher is None and (pending or text_todo or cache.read_manifest(cache_dir) is None):
        teacher = create_teacher(spec, resolve_device(cfg.device))
    if teacher is not None:
        with cache.manifest_lock(cache_dir):
            _write_manifest(cache_dir, index, _provenance(teacher, templates, cfg), False, found, failed)
    if pending and not spec.remote:
        progress = _with_estimate(progress, teacher.device, len(pending))
    text_queries, n_failed = _pay(index, cache_dir, teacher, templates, pending, text_todo, cfg, progress)
    report = _finish(index, cache_dir, cfg, teacher, templates, found, pending, n_failed, text_queries)
    return replace(report, plan={**asdict(plan), "queries": plan.queries}, cost=teacher.cost() if teacher else {})


def _pay(index, cache_dir, teacher, templates, pending, text_todo, cfg, progress) -> tuple[int, int]:
    """The text prompts, then the images; this part's cost file follows every shard written.
    Returns (prompts embedded, images that failed to decode)."""
    if teacher is None:
        return 0, 0
    earlier = cache.read_cost(cache_dir, cfg.shard)

    def record_cost() -> None:
        cache.write_cost(cache_dir, cfg.shard, cache.add_costs(earlier, teacher.cost()))

    try:
        text_queries = 0
        if text_todo:
            per_template, class_emb = build_text_embeddings(teacher, index.classnames, templates)
            cache.write_text(cache_dir, index.classnames, templates, per_template, class_emb, teacher.logit_scale)
            text_queries = len(index.classnames) * len(templates)
        n_failed = _embed_images(index, cache_dir, teacher, pending, cfg, progress, record_cost) if pending else 0
    finally:
        record_cost()
    return text_queries, n_failed


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


@dataclass
class _OpenShard:
    """A shard whose batches are still being answered."""

    rows: np.ndarray
    emb: np.ndarray
    ok: np.ndarray
    answered: np.ndarray
    batches_left: int

    @classmethod
    def empty(cls, rows: np.ndarray, dim: int, dtype, batch_size: int) -> _OpenShard:
        n = len(rows)
        return cls(rows, np.zeros((n, dim), dtype=dtype), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), -(-n // batch_size))


def _embed_images(index: DatasetIndex, cache_dir: Path, teacher: TeacherBackend, pending: list[int], cfg: EmbedConfig, progress: Progress | None, on_shard) -> int:
    """Embed `pending` rows in shards of whole batches: batches never straddle shards, so a resumed
    run sees exactly the batches an uninterrupted one would. A shard is written once all its batches
    are answered (a remote teacher's may complete out of order); after a fatal error the answered
    rows of unfinished shards are written too, so every row paid for is kept."""
    store = np.float16 if cfg.store_dtype == "fp16" else np.float32
    size = cfg.rows_per_shard(parse_teacher_spec(cfg.teacher).remote)
    shards = [np.array(pending[s : s + size]) for s in range(0, len(pending), size)]
    batches = [(i, s) for i, rows in enumerate(shards) for s in range(0, len(rows), cfg.batch_size)]
    paths = [[index.files[r].path for r in shards[i][s : s + cfg.batch_size]] for i, s in batches]
    k = cache.next_shard_number(cache_dir, cfg.shard)

    def write(shard: _OpenShard, keep: np.ndarray) -> int:
        nonlocal k
        cache.write_shard(cache_dir / cache.shard_name(k, cfg.shard), index, shard.rows[keep], shard.emb[keep], shard.ok[keep])
        k += 1
        on_shard()
        return int((~shard.ok[keep]).sum())

    open_shards: dict[int, _OpenShard] = {}
    done, n_failed = 0, 0
    try:
        for b, emb, ok in teacher.encode_image_files(index.root, paths, cfg.workers, cfg.precision):
            i, s = batches[b]
            if i not in open_shards:
                open_shards[i] = _OpenShard.empty(shards[i], teacher.embed_dim, store, cfg.batch_size)
            shard = open_shards[i]
            part = slice(s, s + len(ok))
            shard.emb[part], shard.ok[part], shard.answered[part] = emb.astype(store), ok, True
            shard.batches_left -= 1
            if shard.batches_left == 0:
                n_failed += write(open_shards.pop(i), np.ones(len(shard.rows), dtype=bool))
            done += len(ok)
            if progress:
                progress(done, len(pending))
    except UserError:
        for shard in open_shards.values():
            if shard.answered.any():
                write(shard, shard.answered)
        raise
    return n_failed


def _write_manifest(cache_dir: Path, index: DatasetIndex, provenance: dict, complete: bool, found: dict, failed: np.ndarray) -> None:
    """The manifest with the cost ledger, how many usable images have a target, and whether a
    complete cache holds only a subset (`--budget subset`). Call it under `cache.manifest_lock`."""
    with_targets = sum(int(r) in found and not failed[r] for r in index.good)
    missing = sum(int(r) not in found for r in index.good)
    cache.write_manifest(
        cache_dir, index, provenance, complete=complete, queries=cache.count_queries(cache_dir),
        cost=cache.total_cost(cache_dir), images_with_targets=with_targets, subset=complete and missing > 0,
    )


def _finish(index, cache_dir, cfg, teacher, templates, found, pending, n_failed, text_queries) -> EmbedReport:
    """Write the manifest; it is complete once every part's images (or the budget's subset, all
    embedded by now) and the text are in."""
    with cache.manifest_lock(cache_dir):  # the last of parts finishing together sees every shard
        found_now, failed_now = cache.match_rows(index, cache_dir)
        text = cache.read_text(cache_dir)
        images_in = cfg.budget == "subset" or all(int(r) in found_now for r in index.good)
        complete = images_in and text is not None and text["classes"] == index.classnames
        provenance = _provenance(teacher, templates, cfg) if teacher else cache.read_manifest(cache_dir)["provenance"]
        _write_manifest(cache_dir, index, provenance, complete, found_now, failed_now)
        manifest = cache.read_manifest(cache_dir)
    return EmbedReport(
        cache_dir=cache_dir,
        embedded=len(pending) - n_failed,
        reused=len(found),
        failed=len(index.bad) + int(failed_now.sum()),
        text_queries=text_queries,
        complete=complete,
        queries_total=manifest["queries"],
        images_with_targets=manifest["images_with_targets"],
    )


# A CPU embed expected to take longer than this says so, with its estimate, after the first batch.
LONG_CPU_EMBED_S = 60.0


def _with_estimate(progress: Progress | None, device: torch.device, total: int) -> Progress:
    """`progress`, plus one log line after the first batch of a long CPU embed: the throughput
    measured on that batch (worker start-up included, so rather pessimistic) and the time it implies."""
    started, told = time.monotonic(), False

    def update(done: int, n: int) -> None:
        nonlocal told
        if not told:
            told = True
            rate = done / max(time.monotonic() - started, 1e-6)
            if device.type == "cpu" and total / rate >= LONG_CPU_EMBED_S:
                log.warning("%s", estimate_line(total, rate, device))
        if progress:
            progress(done, n)

    return update


def estimate_line(total: int, rate: float, device: torch.device) -> str:
    """'embedding 24,788 images on cpu: about 2.0 h at 3.4 img/s; ...' for `rate` images/s."""
    seconds = total / rate
    if seconds >= 5400:
        took = f"{seconds / 3600:.1f} h"
    elif seconds >= 90:
        took = f"{seconds / 60:.0f} min"
    else:
        took = f"{seconds:.0f} s"
    return (
        f"embedding {total:,} images on {device}: about {took} at {rate:.1f} img/s (measured on the first "
        "batch); use a GPU (--device cuda) or split the work across machines with --shard I/N"
    )
