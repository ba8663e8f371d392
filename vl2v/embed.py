"""The embed job: run the teacher once over every image and class prompt into the cache."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vl2v import cache
from vl2v.data import DatasetIndex, ImageDataset
from vl2v.runtime import Progress, UserError, autocast_dtype, barrier, launch, resolve_device
from vl2v.teacher import DEFAULT_TEACHER, Teacher, build_text_embeddings, create_teacher, load_templates, parse_teacher_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    teacher: str = DEFAULT_TEACHER
    prompts: str = "photo"  # a style of vl2v.teacher.TEMPLATES or a template file
    batch_size: int = 128
    workers: int = min(4, os.cpu_count() or 1)
    device: str = "auto"
    precision: str = "fp32"
    store_dtype: str = "fp16"  # how image embeddings are stored: fp16 or fp32
    shard_size: int = 8192  # images per shard; a whole number of batches
    shard: tuple[int, int] = (1, 1)  # this process's part I of N

    def __post_init__(self):
        i, n = self.shard
        if not 1 <= i <= n:
            raise UserError(f"--shard {i}/{n}: I must be between 1 and N.")
        if self.store_dtype not in ("fp16", "fp32"):
            raise UserError(f"--store-dtype must be fp16 or fp32, not '{self.store_dtype}'.")
        if self.batch_size < 1 or self.shard_size < self.batch_size:
            raise UserError("--batch-size must be ≥ 1 and --shard-size ≥ --batch-size.")


@dataclass
class EmbedReport:
    cache_dir: Path
    embedded: int  # images the teacher saw in this run
    reused: int  # images already in the cache
    failed: int  # images that did not decode (scan or embed)
    text_queries: int  # prompts the teacher saw in this run
    complete: bool  # manifest says complete: every part done
    queries_total: dict  # everything ever paid for this cache folder


def _check_provenance(cache_dir: Path, spec: str) -> None:
    manifest = cache.read_manifest(cache_dir)
    if manifest is not None and manifest["provenance"]["teacher"] != spec:
        raise UserError(
            f"{cache_dir} holds embeddings of teacher {manifest['provenance']['teacher']}, not {spec}. "
            "Pass another --cache-dir, or delete that folder."
        )


def embed_dataset(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, progress: Progress | None = None) -> EmbedReport:
    """Embed every image of `index` not yet in `cache_dir`, and the class prompts; resumable. A
    second run of the same part waits for the first (`cache.part_lock`), then pays for what is left."""
    spec = str(parse_teacher_spec(cfg.teacher))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_provenance(cache_dir, spec)  # before waiting for a lock: a wrong teacher fails at once
    with cache.part_lock(cache_dir, cfg.shard):
        return _embed_part(index, cache_dir, cfg, spec, progress)


def _embed_part(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, spec: str, progress: Progress | None) -> EmbedReport:
    """`embed_dataset` under the part's lock: no live run of this part is left to race with."""
    _check_provenance(cache_dir, spec)  # again: the run waited for may have written the first manifest
    part = cfg.shard
    for stale in cache_dir.glob(cache.tmp_pattern(part)):
        stale.unlink()  # a shard a killed run of this part left half-written
    templates = load_templates(cfg.prompts)
    found, failed = cache.match_rows(index, cache_dir)  # read under the lock: what a holder wrote counts
    cache.record_new_times(index, cache_dir, found, part, cfg.shard_size)
    pending = [int(r) for r in index.good if r not in found and r % part[1] == part[0] - 1]
    text = cache.read_text(cache_dir)
    text_todo = part[0] == 1 and (text is None or text["classes"] != index.classnames or text["templates"] != templates)
    teacher = None
    if pending or text_todo or cache.read_manifest(cache_dir) is None:
        device = resolve_device(cfg.device)
        teacher = create_teacher(spec, device)
    if teacher is not None:
        provenance = _provenance(teacher, templates, cfg)
        with cache.manifest_lock(cache_dir):
            cache.write_manifest(cache_dir, index, provenance, complete=False, queries=cache.count_queries(cache_dir))
    text_queries = 0
    if text_todo:
        per_template, class_emb = build_text_embeddings(teacher, index.classnames, templates)
        cache.write_text(cache_dir, index.classnames, templates, per_template, class_emb, teacher.logit_scale)
        text_queries = len(index.classnames) * len(templates)
    if pending:
        progress = _with_estimate(progress, teacher.device, len(pending))
    n_failed = _embed_images(index, cache_dir, teacher, pending, cfg, progress) if pending else 0
    return _finish(index, cache_dir, cfg, teacher, templates, found, pending, n_failed, text_queries, failed)


def embed_all_parts(index: DatasetIndex, cache_dir: Path, cfg: EmbedConfig, progress: Progress | None = None) -> EmbedReport:
    """`embed_dataset`; under torchrun, each process embeds part RANK+1 of WORLD_SIZE, then, once
    all are done, every process completes the manifest (nothing is left to embed by then)."""
    me = launch()
    if not me.distributed:
        return embed_dataset(index, cache_dir, cfg, progress)
    mine = embed_dataset(index, cache_dir, replace(cfg, shard=(me.rank + 1, me.world_size)), progress)
    barrier()
    return replace(embed_dataset(index, cache_dir, replace(cfg, shard=(1, 1))), embedded=mine.embedded, text_queries=mine.text_queries)


def _provenance(teacher: Teacher, templates: list[str], cfg: EmbedConfig) -> dict:
    return {**teacher.provenance(), "templates": templates, "prompts": cfg.prompts, "store_dtype": cfg.store_dtype}


def _embed_images(index: DatasetIndex, cache_dir: Path, teacher: Teacher, pending: list[int], cfg: EmbedConfig, progress: Progress | None) -> int:
    """Embed `pending` rows shard by shard; batches never straddle shards, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    amp = autocast_dtype(cfg.precision, teacher.device)
    store = np.float16 if cfg.store_dtype == "fp16" else np.float32
    size = (3, *teacher.image_size)
    k = cache.next_shard_number(cache_dir, cfg.shard)
    done, n_failed = 0, 0
    for start in range(0, len(pending), cfg.shard_size):
        rows = np.array(pending[start : start + cfg.shard_size])
        dataset = ImageDataset(index.root, [index.files[r].path for r in rows], teacher.preprocess, size)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=teacher.device.type == "cuda")
        emb = np.zeros((len(rows), teacher.embed_dim), dtype=store)
        ok = np.zeros(len(rows), dtype=bool)
        for images, idx, good in loader:
            keep = good.nonzero().flatten()
            if len(keep):
                with torch.autocast(teacher.device.type, dtype=amp, enabled=amp is not None):
                    emb[idx[keep].numpy()] = teacher.encode_images(images[keep]).cpu().numpy().astype(store)
            ok[idx.numpy()] = good.numpy()
            done += len(idx)
            if progress:
                progress(done, len(pending))
        cache.write_shard(cache_dir / cache.shard_name(k, cfg.shard), index, rows, emb, ok)
        n_failed += int((~ok).sum())
        k += 1
    return n_failed


def _finish(index, cache_dir, cfg, teacher, templates, found, pending, n_failed, text_queries, failed) -> EmbedReport:
    """Write the manifest; it is complete once every part's images and the text are in."""
    with cache.manifest_lock(cache_dir):  # the last of parts finishing together sees every shard
        found_now, failed_now = cache.match_rows(index, cache_dir)
        text = cache.read_text(cache_dir)
        complete = all(int(r) in found_now for r in index.good) and text is not None and text["classes"] == index.classnames
        provenance = _provenance(teacher, templates, cfg) if teacher else cache.read_manifest(cache_dir)["provenance"]
        queries = cache.count_queries(cache_dir)
        cache.write_manifest(cache_dir, index, provenance, complete=complete, queries=queries)
    return EmbedReport(
        cache_dir=cache_dir,
        embedded=len(pending) - n_failed,
        reused=len(found),
        failed=len(index.bad) + int(failed_now.sum()),
        text_queries=text_queries,
        complete=complete,
        queries_total=queries,
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
