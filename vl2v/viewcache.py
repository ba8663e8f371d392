"""The teacher's embeddings of augmented views, beside a cache's image shards (`vl2v embed --views K`).

    views-k0000-0004-00000.h5         rows: path, size, mtime_ns, sha256, ok, embedding [N, 4, D]
                                      (fp16 by default), params [N, 4, N_PARAMS] float32; attributes
                                      k_start, k_stop, view_seed, view_queries
    views-p2of4-k0004-0008-00000.h5   views 4..7 of the rows of `--shard 2/4`
    views-<digest>-embedding.npy      every dataset row's K views [N, K, D], consolidated for training
    views-<digest>-params.npy         their parameters [N, K, N_PARAMS] float32
A shard holds views k_start..k_stop-1 of its rows, so raising K later writes shards of the new views
only. Rows match dataset images as the image shards' do (relative path and content:
`vl2v.cache.match_rows`). Shards are written under a temporary name and renamed, as image shards.
The consolidated files are memory-mapped by training, which gathers a batch's targets from them
without holding [N, K, D] in memory; their digest covers every shard they were built from.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from filelock import FileLock

from vl2v.cache import CachedRow, match_rows, read_embeddings, row_keys, write_h5_atomic
from vl2v.data import DatasetIndex
from vl2v.views import N_PARAMS

VIEW_SHARD_RE = re.compile(r"^views-(?:p(\d+)of(\d+)-)?k(\d{4})-(\d{4})-(\d{5})\.h5$")
CONSOLIDATED_RE = re.compile(r"^views-[0-9a-f]{16}-(embedding|params)\.npy$")
CONSOLIDATE_ROWS = 1024  # rows read from a shard at a time while consolidating: bounded memory

ViewRows = dict[range, dict[int, CachedRow]]  # k range -> {dataset row: where its views are}


def view_shard_name(ks: range, number: int, part: tuple[int, int] = (1, 1)) -> str:
    i, n = part
    label = "" if n == 1 else f"p{i}of{n}-"
    return f"views-{label}k{ks.start:04d}-{ks.stop:04d}-{number:05d}.h5"


def view_tmp_pattern(part: tuple[int, int]) -> str:
    """Glob of the temporary files of one part's view shards (and only that part's)."""
    i, n = part
    return ".views-k*.h5.tmp" if n == 1 else f".views-p{i}of{n}-*.h5.tmp"


def list_view_shards(cache_dir: Path) -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob("views-*.h5") if VIEW_SHARD_RE.match(p.name))


def shard_views(shard: Path) -> range:
    """The views k_start..k_stop-1 a view shard holds, from its name."""
    m = VIEW_SHARD_RE.match(Path(shard).name)
    return range(int(m.group(3)), int(m.group(4)))


def next_view_shard_number(cache_dir: Path, ks: range, part: tuple[int, int]) -> int:
    taken = [
        int(m.group(5))
        for p in list_view_shards(cache_dir)
        if (m := VIEW_SHARD_RE.match(p.name)) and shard_views(p) == ks
        and (m.group(1) is None if part[1] == 1 else (int(m.group(1)), int(m.group(2))) == part)
    ]
    return max(taken, default=-1) + 1


def write_view_shard(path: Path, index: DatasetIndex, rows: np.ndarray, emb: np.ndarray, params: np.ndarray, ok: np.ndarray,
                     ks: range, seed: int, queries: int | None = None) -> None:
    """Views `ks` of dataset rows `rows`: [N, K', D] embeddings, [N, K', N_PARAMS] parameters, decode
    flags. `queries`: teacher queries they cost (default: K' per decoded image; 0 for copied rows)."""
    arrays = {**row_keys(index, rows), "ok": ok.astype(bool), "embedding": emb, "params": params.astype(np.float32)}
    paid = int(ok.sum()) * len(ks) if queries is None else queries
    write_h5_atomic(path, arrays, {"k_start": ks.start, "k_stop": ks.stop, "view_seed": seed, "view_queries": paid})


def match_views(index: DatasetIndex, cache_dir: Path) -> ViewRows:
    """For each k range stored, which dataset rows its shards hold (matched as image rows are)."""
    by_range: dict[range, list[Path]] = {}
    for shard in list_view_shards(cache_dir):
        by_range.setdefault(shard_views(shard), []).append(shard)
    return {ks: match_rows(index, cache_dir, shards)[0] for ks, shards in sorted(by_range.items(), key=lambda kv: (kv[0].start, kv[0].stop))}


def views_covered(view_rows: ViewRows, n_rows: int) -> np.ndarray:
    """[N] int: how many views 0..c-1 each dataset row has in the cache (views stored beyond a gap
    do not count)."""
    covered = np.zeros(n_rows, dtype=np.int64)
    for ks, found in view_rows.items():  # sorted by start: a range extends what precedes it
        rows = np.fromiter(found, dtype=np.int64, count=len(found))
        reach = rows[covered[rows] >= ks.start]
        covered[reach] = np.maximum(covered[reach], ks.stop)
    return covered


def pending_views(covered: np.ndarray, candidates, count: int) -> dict[range, list[int]]:
    """The views still to embed for `candidates` to have `count` each: {k range: rows}."""
    todo: dict[range, list[int]] = {}
    for r in candidates:
        if covered[r] < count:
            todo.setdefault(range(int(covered[r]), count), []).append(int(r))
    return todo


def count_view_queries(cache_dir: Path) -> int:
    """Teacher queries paid for every view shard of the cache folder (stale rows included)."""
    total = 0
    for shard in list_view_shards(cache_dir):
        with h5py.File(shard, "r") as f:
            total += int(f.attrs["view_queries"])
    return total


def stored_view_seed(cache_dir: Path) -> int | None:
    """The view seed the cache's view shards were drawn with (None: no view shards)."""
    shards = list_view_shards(cache_dir)
    if not shards:
        return None
    with h5py.File(shards[0], "r") as f:
        return int(f.attrs["view_seed"])


def views_section(cache_dir: Path, count: int, seed: int, covered: np.ndarray, good: np.ndarray) -> dict:
    """The manifest's `views`: views per image asked for, their seed, queries, shards."""
    return {
        "count": count,
        "seed": seed,
        "queries": count_view_queries(cache_dir),
        "images_with_views": int((covered[good] >= count).sum()) if count else 0,
        "shards": [p.name for p in list_view_shards(cache_dir)],
    }


def record_new_view_times(index: DatasetIndex, cache_dir: Path, view_rows: ViewRows, part: tuple[int, int], shard_size: int) -> int:
    """As `vl2v.cache.record_new_times`, for view shards: the views of this part's images found by
    content alone stored again under their current size and mtime (no teacher query)."""
    i, n = part
    moved_total = 0
    for ks, found in view_rows.items():
        moved = [r for r, row in sorted(found.items()) if r % n == i - 1 and (row.size, row.mtime_ns) != (index.files[r].size, index.files[r].mtime_ns)]
        number = next_view_shard_number(cache_dir, ks, part)
        for start in range(0, len(moved), shard_size):
            rows = moved[start : start + shard_size]
            stored = [found[r] for r in rows]
            with h5py.File(stored[0].shard, "r") as f:
                seed = int(f.attrs["view_seed"])
            emb, params = read_embeddings(stored), read_embeddings(stored, name="params")
            ok = np.array([row.ok for row in stored])
            write_view_shard(cache_dir / view_shard_name(ks, number, part), index, np.array(rows), emb, params, ok, ks, seed, queries=0)
            number += 1
        moved_total += len(moved)
    return moved_total


# --- training: the views consolidated into memory-mapped files --------------------------------------


def open_random_access(path: Path) -> np.ndarray:
    """A read-only memory map of an .npy file, advised for random access: a batch's rows are read,
    not the kernel's readahead around each of them (128 KB per row where the file is not cached)."""
    layout = np.load(path, mmap_mode="r")  # for its offset, dtype and shape
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):  # not on Windows
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=layout.dtype, count=layout.size, offset=layout.offset).reshape(layout.shape)


class ParamsFile:
    """The consolidated [N, K, N_PARAMS] float32 view parameters, memory-mapped on first use in each
    process: forked data-loader workers inherit the mapping, spawned ones map the file again
    (pickling carries only the path)."""

    def __init__(self, path: Path, array: np.ndarray | None = None):
        self.path, self._array = Path(path), array

    def __getstate__(self) -> dict:
        return {"path": self.path, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = open_random_access(self.path)
        return self._array


@dataclass
class ViewTargets:
    """The teacher's embeddings of every dataset row's views 0..count-1, memory-mapped."""

    count: int  # K views per image
    seed: int  # the view seed they were drawn with
    embedding: np.ndarray  # [N, K, D] memory-mapped, the stored dtype (fp16 by default), L2-normalised
    params: ParamsFile  # [N, K, N_PARAMS] float32
    valid: np.ndarray  # [N] bool: every view embedded and decoded
    digest: str  # of the shards and rows the files were built from

    def gather(self, rows: np.ndarray, ks: np.ndarray) -> torch.Tensor:
        """[B, D] float32 targets of views `ks` of dataset rows `rows`: B rows read, nothing more."""
        return torch.from_numpy(np.asarray(self.embedding[rows, ks], dtype=np.float32))


def _sources(view_rows: ViewRows, count: int, n_rows: int) -> tuple[dict[int, list[tuple[range, CachedRow]]], np.ndarray]:
    """For each dataset row with views 0..count-1: the stored rows that give them, as
    [(views taken, stored row)], later ranges overriding earlier ones; and the [N] valid mask."""
    covered = views_covered(view_rows, n_rows)
    sources: dict[int, list[tuple[range, CachedRow]]] = {}
    valid = covered >= count
    for ks, found in view_rows.items():
        if ks.start >= count:
            continue
        for r, row in found.items():
            if valid[r]:
                sources.setdefault(r, []).append((range(ks.start, min(ks.stop, count)), row))
                valid[r] &= row.ok
    return sources, valid


def _digest(index: DatasetIndex, sources: dict, count: int) -> str:
    """What the consolidated files hold: every row's sources, and each source shard's size and mtime
    (a shard re-written under the same name makes another digest)."""
    h = hashlib.sha256(f"{count}\n".encode())
    shards = set()
    for r in sorted(sources):
        h.update(index.files[r].path.encode())
        for ks, row in sources[r]:
            h.update(f"\t{row.shard.name}:{row.pos}:{ks.start}-{ks.stop}".encode())
            shards.add(row.shard)
        h.update(b"\n")
    for shard in sorted(shards):
        st = shard.stat()
        h.update(f"{shard.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_view_targets(cache_dir: Path, index: DatasetIndex, section: dict) -> ViewTargets:
    """The cache's views for `index`, consolidated once into `views-<digest>-*.npy` (written
    atomically, under a lock; older consolidations of the folder are removed) and memory-mapped."""
    cache_dir, count = Path(cache_dir), int(section["count"])
    sources, valid = _sources(match_views(index, cache_dir), count, len(index.files))
    digest = _digest(index, sources, count)
    emb_path, params_path = (cache_dir / f"views-{digest}-{what}.npy" for what in ("embedding", "params"))
    with FileLock(cache_dir / ".views.lock"):
        if not emb_path.exists():
            _consolidate(sources, count, len(index.files), params_path, emb_path)
        for stale in cache_dir.glob("views-*.npy"):
            if CONSOLIDATED_RE.match(stale.name) and stale not in (emb_path, params_path):
                stale.unlink()  # a process that mapped it keeps its pages; the name is free
        # mapped now, under the lock: a later consolidation may remove the files, not these mappings
        embedding, params = open_random_access(emb_path), ParamsFile(params_path, open_random_access(params_path))
    return ViewTargets(count, int(section["seed"]), embedding, params, valid, digest)


def _consolidate(sources: dict, count: int, n_rows: int, params_path: Path, emb_path: Path) -> None:
    """Write every row's views into [N, K, ...] files, a shard at a time in row chunks; parameters
    first, embeddings last: the embedding file's name appearing means both are whole."""
    by_shard: dict[Path, list[tuple[int, range, int]]] = {}
    for r, parts in sources.items():
        for ks, row in parts:
            by_shard.setdefault(row.shard, []).append((r, ks, row.pos))
    dim, dtype = 0, np.float16  # no row has its views (none to train from): empty files
    if by_shard:
        with h5py.File(next(iter(by_shard)), "r") as f:
            dim, dtype = f["embedding"].shape[2], f["embedding"].dtype
    for path, name, shape, kind in ((params_path, "params", (n_rows, count, N_PARAMS), np.float32), (emb_path, "embedding", (n_rows, count, dim), dtype)):
        tmp = path.with_name(f".{path.name}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=kind, shape=shape)
        for shard, entries in by_shard.items():
            _copy_shard(shard, entries, name, out)
        out.flush()
        del out
        os.replace(tmp, path)


def _copy_shard(shard: Path, entries: list[tuple[int, range, int]], name: str, out: np.ndarray) -> None:
    """Copy dataset `name` of a view shard's rows into `out[row, ks]`, CONSOLIDATE_ROWS rows at a time."""
    first = shard_views(shard).start
    entries = sorted(entries, key=lambda e: e[2])
    with h5py.File(shard, "r") as f:
        data = f[name]
        for start in range(0, len(entries), CONSOLIDATE_ROWS):
            chunk = entries[start : start + CONSOLIDATE_ROWS]
            lo, hi = chunk[0][2], chunk[-1][2] + 1
            block = data[lo:hi]  # one contiguous read
            for r, ks, pos in chunk:
                out[r, ks.start : ks.stop] = block[pos - lo, ks.start - first : ks.stop - first]
