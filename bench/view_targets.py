"""Benchmark of the views' targets in training (issue #10): the memory the target gather needs at
DomainNet scale, against the fp16 size of the views on disk.

In a fresh process per size: synthetic view shards (`vl2v.viewcache.write_view_shard`, fp16, as
`vl2v embed --views K` writes them; `--shard-rows` images each) for N images of a synthetic dataset
index (content keys given, so no image file exists or is read), then what training does with
them: `vl2v.viewcache.load_view_targets` (match the rows, consolidate the shards into the
memory-mapped [N, K, D] file) and `ViewTargets.gather` for `--batches` batches of random (row,
view) pairs, twice: cold (the file's pages dropped from the page cache first, `posix_fadvise
DONTNEED`, as for a file larger than memory; the bytes read from storage are reported) and warm
(the whole file in the page cache, whose pages the mapping then shows as RSS). Each phase's
peak RSS (VmHWM) and its rise over the RSS it started at, split at the end into anonymous memory
(what the process really holds) and file pages (the page cache mapped in, which the kernel reclaims
under pressure), against the fp16 size of the views on disk.
The per-image slopes between the sizes say what DomainNet's 586,575 images cost.

    .venv/bin/python bench/view_targets.py                              # 36k and 146k images, K 16, D 512
    .venv/bin/python bench/view_targets.py --sizes 4096 16384 --batches 200   # quick

Target: the gather's anonymous memory flat in N (it never holds [N, K, D], fp16 or fp32); at
DomainNet scale far below the 19 GB an fp32 copy would take.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import settings, write_result

DOMAINNET = 586_575


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss() -> dict:
    return {"rss_mb": _status_kb("VmRSS") / 1024, "anon_mb": _status_kb("RssAnon") / 1024, "file_mb": _status_kb("RssFile") / 1024}


class Phase:
    """Peak RSS (VmHWM, reset at the start) of a phase, and its RSS split at the end."""

    def __enter__(self):
        self.start = rss()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        self.tic = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.tic
        self.peak_mb = _status_kb("VmHWM") / 1024
        self.end = rss()

    def figures(self) -> dict:
        return {"seconds": self.seconds, "start": self.start, "peak_rss_mb": self.peak_mb, "extra_peak_mb": self.peak_mb - self.start["rss_mb"],
                "end": self.end, "extra_anon_mb": self.end["anon_mb"] - self.start["anon_mb"]}


def read_bytes() -> int:
    """Bytes this process had read from storage (not the page cache)."""
    return int(re.search(r"read_bytes:\s+(\d+)", Path("/proc/self/io").read_text()).group(1))


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gather_batches(targets, n: int, views: int, batches: int, batch: int) -> float:
    rng = np.random.default_rng(1)
    total = 0.0
    for _ in range(batches):
        rows, ks = rng.integers(n, size=batch), rng.integers(views, size=batch)
        total += float(targets.gather(rows, ks).sum())  # the batch is used, as a loss would
    return total


def synthetic_index(n: int, domains: int = 6, classes: int = 345):
    """A DatasetIndex of n files that exist nowhere: their content keys are given, so nothing is read."""
    from vl2v.data import DatasetIndex, ImageFile

    files = [ImageFile(f"d{i % domains}/c{i % classes}/{i:07d}.jpg", i % domains, i % classes, 20_000, 0, sha256=f"{i:064x}") for i in range(n)]
    return DatasetIndex(Path("/nonexistent"), "synthetic", [f"d{d}" for d in range(domains)], [f"c{c}" for c in range(classes)], files)


def write_shards(index, cache_dir: Path, views: int, dim: int, shard_rows: int) -> int:
    """View shards of random unit fp16 embeddings for every row; returns their bytes on disk."""
    from vl2v.viewcache import view_shard_name, write_view_shard
    from vl2v.views import N_PARAMS

    rng = np.random.default_rng(0)
    ks = range(views)
    for number, start in enumerate(range(0, len(index.files), shard_rows)):
        rows = np.arange(start, min(start + shard_rows, len(index.files)))
        emb = rng.standard_normal((len(rows), views, dim), dtype=np.float32)
        emb = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float16)
        params = rng.random((len(rows), views, N_PARAMS), dtype=np.float32)
        write_view_shard(cache_dir / view_shard_name(ks, number), index, rows, emb, params, np.ones(len(rows), dtype=bool), ks, 0)
    return sum(p.stat().st_size for p in cache_dir.glob("views-k*.h5"))


def child(n: int, views: int, dim: int, shard_rows: int, batches: int, batch: int, folder: str) -> None:
    """One size, in a fresh process: write shards, consolidate, gather; prints the figures as JSON."""
    from vl2v.viewcache import load_view_targets

    cache_dir = Path(folder)
    index = synthetic_index(n)
    with Phase() as write:
        disk = write_shards(index, cache_dir, views, dim, shard_rows)
    with Phase() as load:
        targets = load_view_targets(cache_dir, index, {"count": views, "seed": 0})
    consolidated = next(cache_dir.glob("views-*-embedding.npy"))
    drop_from_page_cache(consolidated)  # none of it is mapped yet: as a file larger than memory
    before = read_bytes()
    with Phase() as cold:
        total = gather_batches(targets, n, views, batches, batch)
    cold_read = read_bytes() - before
    del targets  # unmapped; then the whole file in the page cache, mapped afresh
    with open(consolidated, "rb") as f:
        while f.read(1 << 24):
            pass
    targets = load_view_targets(cache_dir, index, {"count": views, "seed": 0})
    with Phase() as warm:
        assert gather_batches(targets, n, views, batches, batch) == total
    print(json.dumps({"images": n, "shards_bytes": disk, "consolidated_bytes": consolidated.stat().st_size, "fp16_bytes": n * views * dim * 2,
                      "write_shards": write.figures(), "load_view_targets": load.figures(), "gather": warm.figures(),
                      "cold_gather": {**cold.figures(), "read_bytes": cold_read}, "checksum": total}))


def run_child(n: int, args, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), str(folder), "--views", str(args.views), "--dim", str(args.dim),
           "--shard-rows", str(args.shard_rows), "--batches", str(args.batches), "--batch", str(args.batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[DOMAINNET // 16, DOMAINNET // 4], help="image counts")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/16: 512)")
    p.add_argument("--shard-rows", type=int, default=512, help="images per view shard (vl2v embed: 8192 views' worth)")
    p.add_argument("--batches", type=int, default=2000, help="batches gathered")
    p.add_argument("--batch", type=int, default=96, help="images per batch (the paper's 3 domains × 32)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def report(sizes: dict) -> dict:
    lo, hi = min(sizes), max(sizes)
    slope = {phase: (sizes[hi][phase]["extra_anon_mb"] - sizes[lo][phase]["extra_anon_mb"]) * 1024 / (hi - lo)
             for phase in ("load_view_targets", "gather")}
    gather_anon = sizes[hi]["gather"]["extra_anon_mb"]
    domainnet_fp16_gb = DOMAINNET * sizes[hi]["fp16_bytes"] / hi / 1e9
    return {
        "anon_kb_per_image": slope,  # what each further image costs, to extrapolate from
        "domainnet_fp16_gb": domainnet_fp16_gb,
        "domainnet_fp32_gb": 2 * domainnet_fp16_gb,
        "domainnet_gather_anon_mb_extrapolated": gather_anon + slope["gather"] * (DOMAINNET - hi) / 1024,
        "domainnet_load_anon_mb_extrapolated": sizes[hi]["load_view_targets"]["extra_anon_mb"] + slope["load_view_targets"] * (DOMAINNET - hi) / 1024,
        "target_met": gather_anon < 0.05 * sizes[hi]["fp16_bytes"] / 2**20,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(int(args.child[0]), args.views, args.dim, args.shard_rows, args.batches, args.batch, args.child[1])
    result = {"settings": settings(args), "loadavg_start": os.getloadavg(), "sizes": {}}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="vl2v-bench-views-") as tmp:
            r = run_child(n, args, Path(tmp))
        result["sizes"][n] = r
        load, gather, cold = r["load_view_targets"], r["gather"], r["cold_gather"]
        print(f"  {n:>7} images × {args.views} views × {args.dim}: fp16 {r['fp16_bytes'] / 2**30:.2f} GiB (shards {r['shards_bytes'] / 2**30:.2f} GiB); "
              f"consolidation {load['seconds']:.0f} s, peak RSS +{load['extra_peak_mb']:.0f} MB, anonymous +{load['extra_anon_mb']:.0f} MB; "
              f"{args.batches} gathers of {args.batch}: {gather['seconds'] / args.batches * 1e3:.2f} ms each, peak RSS +{gather['extra_peak_mb']:.0f} MB "
              f"(file pages {gather['end']['file_mb']:.0f} MB), anonymous +{gather['extra_anon_mb']:.1f} MB; cold: {cold['seconds'] / args.batches * 1e3:.2f} ms "
              f"each, peak RSS +{cold['extra_peak_mb']:.0f} MB, anonymous +{cold['extra_anon_mb']:.1f} MB, {cold['read_bytes'] / 2**20:.0f} MB read "
              f"({cold['read_bytes'] / (args.batches * args.batch) / 1024:.1f} KB per row gathered)", flush=True)
    result.update(report(result["sizes"]), loadavg_end=os.getloadavg())
    print(f"anonymous memory per further image: consolidation {result['anon_kb_per_image']['load_view_targets']:.3f} KB, gather "
          f"{result['anon_kb_per_image']['gather']:.3f} KB -> DomainNet ({DOMAINNET:,} images, {result['domainnet_fp16_gb']:.1f} GB fp16, "
          f"{result['domainnet_fp32_gb']:.1f} GB as fp32): gather about {result['domainnet_gather_anon_mb_extrapolated']:.0f} MB, consolidation "
          f"about {result['domainnet_load_anon_mb_extrapolated']:.0f} MB (target flat: {'met' if result['target_met'] else 'NOT met'})")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
