"""Benchmark of content keys in the cache (issue #14): what hashing every image's bytes costs.

On N JPEGs (default 2,000 at 227 px, PACS-like files of ~20 KB), medians of wall and CPU time
over --repeats interleaved rounds (after a warm-up round):
  listing      `scan_dataset(check_images=False)`: what training runs, no file is read
  scan         `scan_dataset()`: what `vl2v embed` runs: every file read once, decoded and hashed
  scan_nohash  the same scan with sha256 replaced by a no-op, so `scan - scan_nohash` is the
               hashing's own cost inside the scan (its bytes are read for decoding anyway)
  hash_only    `hash_files` over every image: read + sha256, no decoding (page cache warm)
and the start of training (`load_dataset_targets`: listing + matching the cache + gathering) on
a cache of random embeddings (no teacher: only keys are timed):
  start_same    the dataset the cache was built from: (path, size, mtime) match, nothing hashed
  start_copy    a copy with new mtimes: every image hashed once to match by content
  start_rekeyed the copy after `record_new_times` (what `vl2v embed` on it does): no hashing again

    .venv/bin/python bench/cache_keys.py                      # 2,000 images, 5 rounds
    .venv/bin/python bench/cache_keys.py --images 500 --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from common import write_result
from vl2v import cache
from vl2v.cache import load_dataset_targets
from vl2v.data import hash_files, scan_dataset

DOMAINS = ("art", "photo", "sketch")
CLASSES = ("cat", "dog", "horse", "sea_lion")


def make_images(root: Path, n: int, px: int, seed: int = 0) -> Path:
    """n JPEGs root/<domain>/<class>/<i>.jpg: a smooth random gradient plus mild noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)
    for i in range(n):
        domain, cls = DOMAINS[i % len(DOMAINS)], CLASSES[(i // len(DOMAINS)) % len(CLASSES)]
        a, b = rng.random((2, 1, 1, 3), dtype=np.float32) * 255
        arr = 0.8 * (a * ramp[None, :, None] + b * ramp[:, None, None]) / 2
        arr = (arr + rng.random((px, px, 3), dtype=np.float32) * 48).clip(0, 255)
        path = root / domain / cls / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
    return root


def write_random_cache(root: Path, cache_dir: Path, dim: int = 512) -> None:
    """A complete cache of random fp16 embeddings for `root`, written with the cache's own API."""
    index = scan_dataset(root)
    rows = np.arange(len(index.files))
    emb = np.random.default_rng(0).standard_normal((len(rows), dim)).astype(np.float16)
    cache_dir.mkdir(parents=True)
    cache.write_shard(cache_dir / cache.shard_name(0), index, rows, emb, np.ones(len(rows), dtype=bool))
    text = torch.nn.functional.normalize(torch.randn(len(index.classes), dim), dim=-1)
    cache.write_text(cache_dir, index.classnames, ["a photo of a {}"], text[:, None], text, 100.0)
    cache.write_manifest(cache_dir, index, {"teacher": "random"}, complete=True, queries={})


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time (all threads) moves less with other jobs' load."""
    tic, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - tic, time.process_time() - cpu


def medians(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """{name: {"wall": s, "cpu": s}}: medians over `repeats` rounds after one warm-up round; each
    round runs every function once, in turn, so that load drift hits all of them alike."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {name: {"wall": statistics.median(w for w, _ in r), "cpu": statistics.median(c for _, c in r)} for name, r in runs.items()}


class NoHash:
    def __init__(self, data: bytes = b""):
        pass

    def hexdigest(self) -> str:
        return ""


def bench(args: argparse.Namespace, tmp: Path) -> dict:
    root = make_images(tmp / "ds", args.images, args.px)
    n, megabytes = args.images, sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6
    index = scan_dataset(root, check_images=False)

    def scan_without_hashing():
        with mock.patch("vl2v.data.hashlib.sha256", NoHash):
            scan_dataset(root)

    t = medians(
        {
            "listing": lambda: scan_dataset(root, check_images=False),
            "scan": lambda: scan_dataset(root),
            "scan_nohash": scan_without_hashing,
            "hash_only": lambda: hash_files(index, list(range(n))),
        },
        args.repeats,
    )
    cache_dir, copy = tmp / "cache", tmp / "copy"
    write_random_cache(root, cache_dir)
    shutil.copytree(root, copy, copy_function=shutil.copyfile)
    for path in copy.rglob("*.jpg"):
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**10))
    t.update(medians({"start_same": lambda: load_dataset_targets(root, cache_dir), "start_copy": lambda: load_dataset_targets(copy, cache_dir)}, args.repeats))
    copied = scan_dataset(copy)
    cache.record_new_times(copied, cache_dir, cache.match_rows(copied, cache_dir)[0], (1, 1), 8192)
    t.update(medians({"start_rekeyed": lambda: load_dataset_targets(copy, cache_dir)}, args.repeats))
    per_image = {clock: {k: 1000 * v[clock] / n for k, v in t.items()} for clock in ("wall", "cpu")}
    return {
        "images": n,
        "megabytes": megabytes,
        "seconds": t,
        "ms_per_image": per_image,
        "hash_share_of_scan": {c: (t["scan"][c] - t["scan_nohash"][c]) / t["scan"][c] for c in ("wall", "cpu")},
        "hash_only_mb_per_s": megabytes / t["hash_only"]["wall"],
        "sha256_mb_per_s_in_memory": sha256_rate(),
    }


def sha256_rate(megabytes: int = 64) -> float:
    data = os.urandom(megabytes * 10**6)
    tic = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return megabytes / (time.perf_counter() - tic)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--px", type=int, default=227, help="side of the JPEGs (PACS: 227)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args(argv)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="vl2v-bench-keys-") as tmp:
        result.update(bench(args, Path(tmp)))
    result["loadavg_end"] = os.getloadavg()
    for clock in ("wall", "cpu"):
        ms, share = result["ms_per_image"][clock], result["hash_share_of_scan"][clock]
        print(f"{clock} ms/image ({result['images']} JPEGs, {result['megabytes']:.1f} MB): listing "
              f"{ms['listing']:.3f}, scan {ms['scan']:.3f} (without hashing {ms['scan_nohash']:.3f}: "
              f"hashing is {100 * share:.1f}% of the scan), hashing alone {ms['hash_only']:.3f}; training "
              f"start: same dataset {ms['start_same']:.3f}, copy with new mtimes {ms['start_copy']:.3f}, "
              f"copy after `vl2v embed` {ms['start_rekeyed']:.3f}")
    print(f"hashing alone {result['hash_only_mb_per_s']:.0f} MB/s; sha256 in memory {result['sha256_mb_per_s_in_memory']:.0f} MB/s")
    print(f"load average {result['loadavg_start']} -> {result['loadavg_end']}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
