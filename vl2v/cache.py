"""The teacher-embedding cache: HDF5 shards of image embeddings, class text embeddings, a manifest.

Layout of a cache folder (default `cache/<dataset>/<teacher>/`):
    manifest.json            provenance, dataset fingerprint, shard list, query counts (written last)
    text.h5                  classes, templates, per-template [C, T, D] and class [C, D] embeddings
    images-00000.h5, ...     rows: path, size, mtime_ns, sha256, ok, embedding [N, D] (fp16 by default)
    images-p2of4-00000.h5    shards written by `--shard 2/4`
    views-k0000-0004-00000.h5, views-*.npy   augmented views' embeddings (see vl2v.viewcache)
    .embed-*.lock, .manifest.lock   file locks (see `part_lock`, `manifest_lock`)
    cost.json, cost-p2of4.json   what each part paid the teacher: queries, requests, retries, bytes
A shard is written under a temporary name and renamed when complete, so a shard that exists is
whole. A row matches a dataset image of the same relative path when their contents' sha256 agree
(or, cheaply, when size and mtime agree: see `match_rows`); rows that match nothing (removed or
changed files) are ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import h5py
import numpy as np
import torch
from filelock import FileLock, Timeout

from vl2v import __version__
from vl2v.data import DatasetIndex, ImageFile, hash_files, scan_dataset
from vl2v.runtime import UserError, atomic_write_json

if TYPE_CHECKING:
    from vl2v.viewcache import ViewTargets

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEXT = "text.h5"
SHARD_RE = re.compile(r"^images-(?:p(\d+)of(\d+)-)?(\d{5})\.h5$")
COST_RE = re.compile(r"^cost(?:-p\d+of\d+)?\.json$")
COST_KEYS = ("image_queries", "view_queries", "text_queries", "from_record", "requests", "retries", "bytes_sent")
# 2: shards store each image's sha256 and the dataset fingerprint leaves out mtimes. Version-1
# caches still load: their rows match by size and mtime, their fingerprint is checked as written.
# 3: view shards (vl2v.viewcache) and the manifest's `views` section; a version-1 or 2 cache is a
# cache without views.
FORMAT_VERSION = 3


def default_cache_dir(cache_root: Path, dataset_name: str, teacher_slug: str) -> Path:
    return Path(cache_root) / dataset_name / teacher_slug


def shard_name(k: int, part: tuple[int, int] = (1, 1)) -> str:
    i, n = part
    return f"images-{k:05d}.h5" if n == 1 else f"images-p{i}of{n}-{k:05d}.h5"


def tmp_pattern(part: tuple[int, int]) -> str:
    """Glob of the temporary files of one part's shards (and only that part's)."""
    i, n = part
    return ".images-[0-9]*.h5.tmp" if n == 1 else f".images-p{i}of{n}-*.h5.tmp"


@contextlib.contextmanager
def part_lock(cache_dir: Path, part: tuple[int, int]) -> Iterator[None]:
    """Hold part I/N of a cache folder while embedding it. Another run of the same part waits,
    saying which process holds it, and then embeds only what the holder left; other parts go on.
    A run of the whole dataset (1/1) also waits for the live runs of `--shard` parts, whose images
    it would embed too. The operating system releases a killed run's locks: none outlives it."""
    i, n = part
    cache_dir = Path(cache_dir)
    if n > 1:
        labels = [f"p{i}of{n}"]
    else:
        labels = ["all", *sorted(m.group(1) for p in cache_dir.glob(".embed-p*.lock") if (m := PART_LOCK_RE.match(p.name)))]
    with contextlib.ExitStack() as held:
        for label in labels:
            held.enter_context(_hold(cache_dir, label))
        yield


PART_LOCK_RE = re.compile(r"^\.embed-(p\d+of\d+)\.lock$")


@contextlib.contextmanager
def _hold(cache_dir: Path, label: str) -> Iterator[None]:
    """Take the lock `.embed-<label>.lock`, and leave a note of who holds it beside it."""
    lock = FileLock(cache_dir / f".embed-{label}.lock")
    holder = cache_dir / f".embed-{label}.holder.json"
    try:
        lock.acquire(timeout=1)  # a holder about to finish is waited for silently
    except Timeout:
        what = "" if label == "all" else "part {}/{} of ".format(*re.findall(r"\d+", label))
        log.info("Waiting for %s, which is embedding %s%s; this run then embeds only what it left.", _holder(holder), what, cache_dir)
        lock.acquire()
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(path: Path) -> str:
    """Who holds a part lock, from the note its holder wrote (the lock file itself holds nothing)."""
    try:
        who = json.loads(path.read_text())
        return f"pid {who['pid']} on host {who['host']} (since {who['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or just removed
        return "another process"


def manifest_lock(cache_dir: Path) -> FileLock:
    """A short cache-wide lock around reading the shards and writing the manifest, so that of
    parts finishing together the last one sees every shard and its manifest stands."""
    return FileLock(Path(cache_dir) / ".manifest.lock")


def list_shards(cache_dir: Path) -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob("images-*.h5") if SHARD_RE.match(p.name))


def next_shard_number(cache_dir: Path, part: tuple[int, int]) -> int:
    taken = [
        int(m.group(3))
        for p in list_shards(cache_dir)
        if (m := SHARD_RE.match(p.name)) and (m.group(1) is None) == (part[1] == 1)
        and (part[1] == 1 or (int(m.group(1)), int(m.group(2))) == part)
    ]
    return max(taken, default=-1) + 1


def write_h5_atomic(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write datasets and attributes to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w", track_order=True) as f:
        for name, arr in arrays.items():
            if arr.dtype.kind == "U":
                f.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype(), track_times=False)
            else:
                f.create_dataset(name, data=arr, track_times=False)
        for k, v in attrs.items():
            f.attrs[k] = v
    os.replace(tmp, path)


def row_keys(index: DatasetIndex, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The key columns of a shard's rows: relative path, size, mtime and sha256 of each file."""
    hash_files(index, [int(r) for r in rows if index.files[r].sha256 is None])  # a scan without decoding
    files = [index.files[r] for r in rows]
    return {
        "path": np.array([f.path for f in files], dtype=str),
        "size": np.array([f.size for f in files], dtype=np.int64),
        "mtime_ns": np.array([f.mtime_ns for f in files], dtype=np.int64),
        "sha256": np.array([f.sha256 or "" for f in files], dtype="S64"),  # "": unreadable now
    }


def write_shard(path: Path, index: DatasetIndex, rows: np.ndarray, emb: np.ndarray, ok: np.ndarray, queries: int | None = None) -> None:
    """One shard: dataset rows `rows` with their [N, D] embeddings and decode flags. `queries`:
    teacher queries it cost (default: its decoded images; 0 for rows copied from other shards)."""
    arrays = {**row_keys(index, rows), "ok": ok.astype(bool), "embedding": emb}
    write_h5_atomic(path, arrays, {"image_queries": int(ok.sum()) if queries is None else queries})


class CachedRow(NamedTuple):
    """Where an image's embedding is stored, and the key it was stored under."""

    shard: Path
    pos: int
    size: int
    mtime_ns: int
    sha256: str | None  # None in format-1 shards
    ok: bool


def read_shard_rows(shard: Path) -> list[tuple[str, CachedRow]]:
    """(relative path, row) for every row of a shard, without its embeddings."""
    with h5py.File(shard, "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["path"][()]]
        hashes = [h.decode() or None for h in f["sha256"][()]] if "sha256" in f else [None] * len(paths)
        keys = zip(f["size"][()].tolist(), f["mtime_ns"][()].tolist(), hashes, f["ok"][()].tolist())
        return [(p, CachedRow(shard, i, *key)) for i, (p, key) in enumerate(zip(paths, keys))]


def _same_times(row: CachedRow, f: ImageFile) -> bool:
    return (row.size, row.mtime_ns) == (f.size, f.mtime_ns)


def _needs_hash(f: ImageFile, rows: list[CachedRow]) -> bool:
    """Whether size and mtime alone cannot tell which cached content `f` holds while a hash can:
    no row has its times (a copied or touched file), or rows with its times differ in content."""
    timed = {r.sha256 for r in rows if _same_times(r, f)}
    return f.sha256 is None and f.error is None and len(timed) != 1 and any(r.sha256 for r in rows)


def _match(f: ImageFile, rows: list[CachedRow]) -> CachedRow | None:
    """The last row holding `f`'s content (the same sha256 when both are known, else the same times),
    preferring one stored under `f`'s own times, so that `record_new_times` records them only once."""
    if f.sha256 is None:
        same = [r for r in rows if _same_times(r, f)]
    else:
        same = [r for r in rows if r.sha256 == f.sha256 or (r.sha256 is None and _same_times(r, f))]
    timed = [r for r in same if _same_times(r, f)]
    return (timed or same)[-1] if same else None


def match_rows(index: DatasetIndex, cache_dir: Path, shards: list[Path] | None = None) -> tuple[dict[int, CachedRow], np.ndarray]:
    """Which dataset rows the shards (default: the image shards) already hold: {row: CachedRow},
    and a decode-failed mask.

    Rows are keyed by relative path and content, never content alone (equal files in two class
    folders are two images). An index from a decoding scan knows every file's sha256; one from a
    listing alone (training) matches by size and mtime, and hashes only the files those do not
    settle, so a copied dataset is recognised at the cost of reading its files once more."""
    wanted = {f.path for f in index.files}
    cached: dict[str, list[CachedRow]] = {}
    for shard in list_shards(cache_dir) if shards is None else shards:
        for path, row in read_shard_rows(shard):
            if path in wanted:
                cached.setdefault(path, []).append(row)
    unsure = [i for i, f in enumerate(index.files) if f.path in cached and _needs_hash(f, cached[f.path])]
    started = time.monotonic()
    hash_files(index, unsure)
    found = {i: row for i, f in enumerate(index.files) if (row := _match(f, cached.get(f.path, [])))}
    if unsure:
        log.info(
            "Hashed %d image(s) whose modification time differs from the cache's (%.1f s); %d match by "
            "content. `vl2v embed '%s'` records their new times, so that later runs skip this.",
            len(unsure), time.monotonic() - started, sum(i in found for i in unsure), index.root,
        )
    failed = np.zeros(len(index.files), dtype=bool)
    failed[[i for i, row in found.items() if not row.ok]] = True
    return found, failed


def read_embeddings(rows: list[CachedRow], out: np.ndarray | None = None, at: list[int] | None = None, name: str = "embedding") -> np.ndarray:
    """The stored embeddings (or another per-row dataset `name`) of `rows` written into `out[at]`
    (default: a new [len(rows), ...] array of the stored dtype, in order); one contiguous read per
    shard, then a gather in memory."""
    at = list(range(len(rows))) if at is None else at
    by_shard: dict[Path, list[int]] = {}
    for k, row in enumerate(rows):
        by_shard.setdefault(row.shard, []).append(k)
    for shard, ks in by_shard.items():
        with h5py.File(shard, "r") as f:
            emb = f[name][()]
        if out is None:
            out = np.zeros((len(rows), *emb.shape[1:]), dtype=emb.dtype)
        out[[at[k] for k in ks]] = emb[[rows[k].pos for k in ks]]
    return out


def record_new_times(index: DatasetIndex, cache_dir: Path, found: dict[int, CachedRow], part: tuple[int, int], shard_size: int) -> int:
    """Store again, under their current size and mtime, the embeddings of this part's images that
    were found by content alone (a copied dataset), so that training matches them without hashing.
    Costs disk space, no teacher query. Returns how many images were recorded."""
    i, n = part
    moved = [r for r, row in sorted(found.items()) if r % n == i - 1 and not _same_times(row, index.files[r])]
    k = next_shard_number(cache_dir, part)
    for start in range(0, len(moved), shard_size):
        rows = moved[start : start + shard_size]
        emb = read_embeddings([found[r] for r in rows])
        ok = np.array([found[r].ok for r in rows])
        write_shard(cache_dir / shard_name(k, part), index, np.array(rows), emb, ok, queries=0)
        k += 1
    if moved:
        log.info("Recorded the new modification times of %d image(s) found by content (no teacher query).", len(moved))
    return len(moved)


def write_text(cache_dir: Path, classes: list[str], templates: list[str], per_template: torch.Tensor, class_emb: torch.Tensor, logit_scale: float) -> None:
    write_h5_atomic(
        Path(cache_dir) / TEXT,
        {
            "classes": np.array(classes, dtype=str),
            "templates": np.array(templates, dtype=str),
            "per_template": per_template.numpy().astype(np.float32),
            "class_embedding": class_emb.numpy().astype(np.float32),
        },
        {"logit_scale": float(logit_scale), "text_queries": len(classes) * len(templates)},
    )


def read_text(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / TEXT
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        as_str = lambda a: [x.decode() if isinstance(x, bytes) else x for x in a]  # noqa: E731
        return {
            "classes": as_str(f["classes"][()]),
            "templates": as_str(f["templates"][()]),
            "per_template": f["per_template"][()],
            "class_embedding": f["class_embedding"][()],
            "logit_scale": float(f.attrs["logit_scale"]),
            "text_queries": int(f.attrs["text_queries"]),
        }


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not {"complete", "dataset", "provenance"} <= manifest.keys():
            raise ValueError("not a vl2v cache manifest")
        return manifest
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or the wrong shape
        raise UserError(f"Corrupt cache manifest {path}: {e}. Delete it and re-run `vl2v embed`.") from None


def write_manifest(cache_dir: Path, index: DatasetIndex, provenance: dict, complete: bool, queries: dict, **fields) -> dict:
    """`fields`: further top-level entries (the embed job's cost ledger, images with targets)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "vl2v_version": __version__,
        "complete": complete,
        "dataset": {
            "name": index.name,
            "root": str(index.root),
            "fingerprint": index.fingerprint(),
            "domains": index.domains,
            "classes": index.classes,
            "num_files": len(index.files),
            # the files its scan could not use: no shard row stands for them
            "unreadable": {f.path: {"size": f.size, "mtime_ns": f.mtime_ns, "sha256": f.sha256} for f in index.bad},
        },
        "provenance": provenance,
        "shards": [p.name for p in list_shards(cache_dir)],
        "queries": queries,
        **fields,
    }
    atomic_write_json(Path(cache_dir) / MANIFEST, manifest)
    return manifest


def count_queries(cache_dir: Path) -> dict:
    """Teacher queries paid for everything in the cache folder (stale rows included)."""
    images = 0
    for shard in list_shards(cache_dir):
        with h5py.File(shard, "r") as f:
            images += int(f.attrs["image_queries"])
    text = read_text(cache_dir)
    return {"images": images, "texts": text["text_queries"] if text else 0}


def cost_name(part: tuple[int, int]) -> str:
    i, n = part
    return "cost.json" if n == 1 else f"cost-p{i}of{n}.json"


def read_cost(cache_dir: Path, part: tuple[int, int]) -> dict:
    """What the runs of one part paid the teacher so far (zeros before the first)."""
    path = Path(cache_dir) / cost_name(part)
    return add_costs(json.loads(path.read_text()) if path.exists() else {})


def write_cost(cache_dir: Path, part: tuple[int, int], cost: dict) -> None:
    atomic_write_json(Path(cache_dir) / cost_name(part), add_costs(cost))


def add_costs(*costs: dict) -> dict:
    return {k: sum(int(c.get(k, 0)) for c in costs) for k in COST_KEYS}


def total_cost(cache_dir: Path) -> dict:
    """The cost ledger of the cache folder: every part's cost file added up."""
    return add_costs(*(json.loads(p.read_text()) for p in sorted(Path(cache_dir).glob("cost*.json")) if COST_RE.match(p.name)))


@dataclass
class Targets:
    """What training needs from the cache, in memory, indexed by dataset row."""

    image: torch.Tensor  # [N, D] float32 L2-normalised; zero rows where `valid` is False
    valid: torch.Tensor  # [N] bool: image embedded and decodable
    text: torch.Tensor  # [C, D] float32 L2-normalised class embeddings
    logit_scale: float
    manifest: dict
    unreadable: torch.Tensor | None = None  # [N] bool: failed to decode when embedded
    views: ViewTargets | None = None  # the augmented views' targets, when asked for and the cache has views

    @property
    def embed_dim(self) -> int:
        return self.text.shape[1]


def _fix_command(index: DatasetIndex, cache_dir: Path, teacher: str) -> str:
    return f"vl2v embed '{index.root}' --teacher '{teacher}' --cache-dir '{cache_dir}'"


def load_targets(cache_dir: Path, index: DatasetIndex, teacher: str | None = None, views: bool = False) -> Targets:
    """Load a complete cache that matches `index` (and `teacher`, if given) or refuse. `views`: also
    the teacher's embeddings of the cache's augmented views, if it has any (memory-mapped)."""
    cache_dir = Path(cache_dir)
    if teacher is not None:  # the stored form: config and weight paths made absolute
        from vl2v.teacher import is_built_by, parse_teacher_spec

        teacher = str(parse_teacher_spec(teacher))
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise UserError(f"No teacher cache at {cache_dir}. Build it with: vl2v embed '{index.root}'" + (f" --teacher '{teacher}'" if teacher else ""))
    built_with = manifest["provenance"]["teacher"]
    fix = _fix_command(index, cache_dir, built_with)
    if teacher is not None and not is_built_by(manifest["provenance"], teacher):  # same model and weights
        raise UserError(f"Cache {cache_dir} was built with teacher {built_with}, not {teacher}. Run: {_fix_command(index, cache_dir, teacher)}")
    if manifest["dataset"]["classes"] != index.classes:
        theirs, ours = manifest["dataset"]["classes"], index.classes
        first = next((f"'{a}' vs '{b}'" for a, b in zip(theirs, ours) if a != b), f"{len(theirs)} vs {len(ours)} classes")
        raise UserError(
            f"Cache {cache_dir} was built for other classes than {index.root} ({first}). Pass this "
            f"dataset's cache with --cache-dir, or build one: vl2v embed '{index.root}' --cache-dir NEW_FOLDER"
        )
    if not manifest["complete"]:
        raise UserError(f"Cache {cache_dir} is incomplete (an embed run was interrupted or shard parts are missing). Finish it with: {fix}")
    found, failed = match_rows(index, cache_dir)
    unchanged = manifest["dataset"]["fingerprint"] == _fingerprint(index, manifest.get("format_version", 1))
    # A --budget subset cache lacks rows by design; its fingerprint still vouches for the dataset.
    missing = [] if manifest.get("subset") and unchanged else _missing(index, found, manifest["dataset"], unchanged)
    if missing or not unchanged:
        cached = {p for shard in list_shards(cache_dir) for p, _ in read_shard_rows(shard)}
        changed = sum(p in cached for p in missing)  # a changed file's old row is not a removal
        stale = max(manifest["dataset"]["num_files"] - (len(index.files) - len(missing)) - changed, 0)
        raise UserError(
            f"Cache {cache_dir} does not match {index.root}: {len(missing)} file(s) new or changed, "
            f"{stale} removed since it was built. Update it (only those are embedded): {fix}"
        )
    return _gather(cache_dir, index, found, failed, manifest, views)


def _missing(index: DatasetIndex, found: dict[int, CachedRow], dataset: dict, unchanged: bool) -> list[str]:
    """Paths of listed files the cache holds no row for, but for those its embed run found
    unreadable and that are still the same files. A format-1 manifest does not list those;
    there, a fingerprint that still matches (mtimes included) vouches that nothing changed."""
    unfound = [i for i, f in enumerate(index.files) if f.error is None and i not in found]
    if "unreadable" not in dataset:
        return [] if unchanged else [index.files[i].path for i in unfound]
    known = dataset["unreadable"]
    moved = [i for i in unfound if (f := index.files[i]).path in known and f.sha256 is None and not _same_file(f, known[f.path])]
    hash_files(index, moved)  # their times moved (a copy?): their bytes decide
    return [index.files[i].path for i in unfound if not _same_file(index.files[i], known.get(index.files[i].path))]


def _same_file(f: ImageFile, known: dict | None) -> bool:
    """Whether `f` is the file `known` describes: the same sha256 when `f`'s is known, else the same times."""
    if known is None:
        return False
    if f.sha256 is not None:
        return f.sha256 == known["sha256"]
    return (f.size, f.mtime_ns) == (known["size"], known["mtime_ns"])


def _fingerprint(index: DatasetIndex, format_version: int) -> str:
    """The dataset fingerprint as a cache of `format_version` wrote it (version 1 included mtimes)."""
    if format_version >= 2:
        return index.fingerprint()
    h = hashlib.sha256()
    for f in index.files:
        h.update(f"{f.path}\t{f.size}\t{f.mtime_ns}\n".encode())
    return h.hexdigest()


def _gather(cache_dir: Path, index: DatasetIndex, found: dict[int, CachedRow], failed: np.ndarray, manifest: dict, views: bool) -> Targets:
    text = read_text(cache_dir)
    image = np.zeros((len(index.files), text["class_embedding"].shape[1]), dtype=np.float32)
    read_embeddings(list(found.values()), image, list(found))
    valid = np.zeros(len(index.files), dtype=bool)
    valid[list(found)] = True
    valid &= ~failed
    # unreadable: failed to decode when embedded, or found unreadable by the embed run's scan (no row)
    known = manifest["dataset"].get("unreadable", {})
    unreadable = failed.copy()
    for i, f in enumerate(index.files):
        if i not in found and f.path in known and _same_file(f, known[f.path]):
            unreadable[i] = True
    view_targets = None
    if views and view_count(manifest):
        from vl2v.viewcache import load_view_targets

        view_targets = load_view_targets(cache_dir, index, manifest["views"])
        valid &= view_targets.valid  # a --budget subset cache: images with all their views
    text_emb = torch.from_numpy(text["class_embedding"])
    return Targets(torch.from_numpy(image), torch.from_numpy(valid), text_emb, text["logit_scale"], manifest, torch.from_numpy(unreadable), view_targets)


def view_count(manifest: dict | None) -> int:
    """Views per image a cache holds (0 for caches before format version 3)."""
    return int(((manifest or {}).get("views") or {}).get("count", 0))


def load_dataset_targets(dataset_root: Path, cache_dir: Path, views: bool = False) -> tuple[DatasetIndex, Targets]:
    """List the dataset (no decoding) and take which of its images are unreadable from the cache.
    Images without a target (a `--budget subset` cache) stay usable for evaluation. `views`: as
    `load_targets`."""
    index = scan_dataset(dataset_root, check_images=False)
    targets = load_targets(cache_dir, index, views=views)
    for f, bad in zip(index.files, targets.unreadable.tolist()):
        if bad and f.error is None:
            f.error = "unreadable (found when embedding)"
    usable, with_targets = len(index.good), int(targets.valid.sum())
    if with_targets < usable:
        log.info("teacher targets for %d of %d usable images (a --budget subset cache): training draws only those", with_targets, usable)
    return index, targets
