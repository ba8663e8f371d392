"""The teacher-embedding cache: HDF5 shards of image embeddings, class text embeddings, a manifest.

Layout of a cache folder (default `cache/<dataset>/<teacher>/`):
    manifest.json            provenance, dataset fingerprint, shard list, query counts (written last)
    text.h5                  classes, templates, per-template [C, T, D] and class [C, D] embeddings
    images-00000.h5, ...     rows: path, size, mtime_ns, ok, embedding [N, D] (fp16 by default)
    images-p2of4-00000.h5    shards written by `--shard 2/4`
    cost.json, cost-p2of4.json   what each part paid the teacher: queries, requests, retries, bytes
A shard is written under a temporary name and renamed when complete, so a shard that exists is
whole. A row matches a dataset image when path, size and mtime agree; rows that match nothing
(removed or changed files) are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from vl2v import __version__
from vl2v.data import DatasetIndex, scan_dataset
from vl2v.runtime import UserError, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEXT = "text.h5"
SHARD_RE = re.compile(r"^images-(?:p(\d+)of(\d+)-)?(\d{5})\.h5$")
COST_RE = re.compile(r"^cost(?:-p\d+of\d+)?\.json$")
COST_KEYS = ("image_queries", "text_queries", "from_record", "requests", "retries", "bytes_sent")
FORMAT_VERSION = 1


def default_cache_dir(cache_root: Path, dataset_name: str, teacher_slug: str) -> Path:
    return Path(cache_root) / dataset_name / teacher_slug


def shard_name(k: int, part: tuple[int, int] = (1, 1)) -> str:
    i, n = part
    return f"images-{k:05d}.h5" if n == 1 else f"images-p{i}of{n}-{k:05d}.h5"


def tmp_pattern(part: tuple[int, int]) -> str:
    """Glob of the temporary files of one part's shards (and only that part's)."""
    i, n = part
    return ".images-[0-9]*.h5.tmp" if n == 1 else f".images-p{i}of{n}-*.h5.tmp"


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


def write_shard(path: Path, index: DatasetIndex, rows: np.ndarray, emb: np.ndarray, ok: np.ndarray) -> None:
    """One shard: dataset rows `rows` with their [N, D] embeddings and decode flags."""
    files = [index.files[r] for r in rows]
    write_h5_atomic(
        path,
        {
            "path": np.array([f.path for f in files], dtype=str),
            "size": np.array([f.size for f in files], dtype=np.int64),
            "mtime_ns": np.array([f.mtime_ns for f in files], dtype=np.int64),
            "ok": ok.astype(bool),
            "embedding": emb,
        },
        {"image_queries": int(ok.sum())},
    )


def read_shard_keys(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["path"][()]]
        return paths, f["size"][()], f["mtime_ns"][()], f["ok"][()]


def match_rows(index: DatasetIndex, cache_dir: Path) -> tuple[dict[int, tuple[Path, int]], np.ndarray]:
    """Which dataset rows the shards already cover: {row: (shard, position)}, and a decode-failed mask."""
    where = {(f.path, f.size, f.mtime_ns): i for i, f in enumerate(index.files)}
    found: dict[int, tuple[Path, int]] = {}
    failed = np.zeros(len(index.files), dtype=bool)
    for shard in list_shards(cache_dir):
        paths, sizes, mtimes, ok = read_shard_keys(shard)
        for pos, key in enumerate(zip(paths, sizes.tolist(), mtimes.tolist())):
            row = where.get(key)
            if row is not None:
                found[row] = (shard, pos)
                failed[row] = not ok[pos]
    return found, failed


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

    @property
    def embed_dim(self) -> int:
        return self.text.shape[1]


def _fix_command(index: DatasetIndex, cache_dir: Path, teacher: str) -> str:
    return f"vl2v embed '{index.root}' --teacher '{teacher}' --cache-dir '{cache_dir}'"


def load_targets(cache_dir: Path, index: DatasetIndex, teacher: str | None = None) -> Targets:
    """Load a complete cache that matches `index` (and `teacher`, if given) or refuse."""
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
    if manifest["dataset"]["fingerprint"] != index.fingerprint():
        missing = [f.path for i, f in enumerate(index.files) if f.error is None and i not in found]
        cached = {p for shard in list_shards(cache_dir) for p in read_shard_keys(shard)[0]}
        changed = sum(p in cached for p in missing)  # a changed file's old row is not a removal
        stale = max(manifest["dataset"]["num_files"] - (len(index.files) - len(missing)) - changed, 0)
        raise UserError(
            f"Cache {cache_dir} does not match {index.root}: {len(missing)} file(s) new or changed, "
            f"{stale} removed since it was built. Update it (only those are embedded): {fix}"
        )
    return _gather(cache_dir, index, found, failed, manifest)


def _gather(cache_dir: Path, index: DatasetIndex, found: dict, failed: np.ndarray, manifest: dict) -> Targets:
    text = read_text(cache_dir)
    dim = text["class_embedding"].shape[1]
    image = np.zeros((len(index.files), dim), dtype=np.float32)
    by_shard: dict[Path, list[tuple[int, int]]] = {}
    for row, (shard, pos) in found.items():
        by_shard.setdefault(shard, []).append((row, pos))
    for shard, pairs in by_shard.items():
        with h5py.File(shard, "r") as f:
            emb = f["embedding"][()]  # one contiguous read per shard, then gather in memory
        rows, pos = map(np.array, zip(*pairs))
        image[rows] = emb[pos].astype(np.float32)
    valid = np.zeros(len(index.files), dtype=bool)
    valid[list(found)] = True
    valid &= ~failed
    text_emb = torch.from_numpy(text["class_embedding"])
    return Targets(torch.from_numpy(image), torch.from_numpy(valid), text_emb, text["logit_scale"], manifest, torch.from_numpy(failed))


def load_dataset_targets(dataset_root: Path, cache_dir: Path) -> tuple[DatasetIndex, Targets]:
    """List the dataset (no decoding) and take which of its images are unreadable from the cache.
    Images without a target (a `--budget subset` cache) stay usable for evaluation."""
    index = scan_dataset(dataset_root, check_images=False)
    targets = load_targets(cache_dir, index)
    for f, bad in zip(index.files, targets.unreadable.tolist()):
        if bad and f.error is None:
            f.error = "unreadable (found when embedding)"
    usable, with_targets = len(index.good), int(targets.valid.sum())
    if with_targets < usable:
        log.info("teacher targets for %d of %d usable images (a --budget subset cache): training draws only those", with_targets, usable)
    return index, targets
