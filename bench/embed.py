"""Benchmark of the embed job (issue #4): throughput of `vl2v.embed.embed_dataset` against the bare
teacher forward, and the job's peak memory as the image count grows.

Throughput: a random-weight open_clip teacher (default ViT-B-16, 224 px) built twice from the same
seed, so both sides run the same network on the same JPEGs with the same batch size:
  bare   `model.encode_image` under `torch.no_grad` on images decoded and preprocessed beforehand;
  embed  the library's `embed_dataset` (what `vl2v embed` runs): decoding workers, teacher, HDF5.
Both skip their first batch (warm-up); embed is timed through its progress callback, so its
steady rate covers the same batches as bare, which runs once before and once after it (load
drift is bracketed). The in-run forward share (time inside `Teacher.encode_images` / embed's
steady wall time) is the same ratio measured within one run, so load drift cannot skew it. The
end-to-end rate (teacher build, text prompts, shard and manifest writes included) is reported.

Memory: in a fresh process per image count, as `vl2v embed` runs: the scan (which decodes every
image), then `embed_dataset`, each phase's peak RSS and its rise over the RSS it started at (and,
in a second traced run, the Python-side rise), with a tiny open_clip ViT (32 px) so that the
run is quick. The per-image slopes between the two counts say what a dataset 50× larger costs.

    .venv/bin/python bench/embed.py                                  # 256 images, memory at 1k, 10k
    .venv/bin/python bench/embed.py --images 64 --batch-size 16      # quicker
    .venv/bin/python bench/embed.py --images 0                       # memory only

Targets: embed ≥ 0.9 × bare forward (images/s); embed_dataset's peak RSS flat from 1k to 10k
images (ratio ≤ 1.1). On a shared machine the cross-run wall-clock ratio swings with other jobs
(the same forward can take 2× longer a minute later); `ratio_estimate` = forward share / (1 +
decoding CPU share) is measured within the embed run and does not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import torch
from PIL import Image

from common import environment, settings, start, write_result
from vl2v.cache import load_targets
from vl2v.data import load_rgb, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.teacher import Teacher

TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
DOMAINS = ("art", "photo", "sketch")
CLASSES = ("cat", "dog", "horse", "sea_lion")


def make_images(root: Path, n: int, px: int, seed: int = 0) -> Path:
    """n JPEGs root/<domain>/<class>/<i>.jpg: a random colour gradient plus noise, px × px."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)
    for i in range(n):
        domain, cls = DOMAINS[i % len(DOMAINS)], CLASSES[(i // len(DOMAINS)) % len(CLASSES)]
        a, b = rng.random((2, 1, 1, 3), dtype=np.float32) * 255
        grad = a * ramp[None, :, None] + b * ramp[:, None, None]
        arr = (0.5 * grad + rng.random((px, px, 3), dtype=np.float32) * 128).clip(0, 255)
        path = root / domain / cls / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
    return root


def write_teacher_config(folder: Path, name: str, config: dict) -> Path:
    """An open_clip model config for `--teacher <name>.json:random`: random weights, nothing downloaded."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


# --- throughput ------------------------------------------------------------------------------


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    """images/s of `encode_image` under no_grad on pre-decoded batches, first batch untimed."""
    load = [os.getloadavg()[0]]
    times, cpu, out = [], [], []
    with torch.no_grad():
        for batch in batches:
            tic, cpu_tic = time.perf_counter(), time.process_time()
            out.append(torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1))
            times.append(time.perf_counter() - tic)
            cpu.append(time.process_time() - cpu_tic)
    load.append(os.getloadavg()[0])
    timed = sum(len(b) for b in batches[1:])
    return {
        "images_per_s": timed / sum(times[1:]),
        "cpu_seconds_per_image": sum(cpu[1:]) / timed,
        "batch_seconds": times,
        "batch_cpu_seconds": cpu,
        "loadavg_1min": load,
        "embeddings": torch.cat(out),
    }


def _timed(method, seconds: list[float]):
    def encode_images(self, images):
        tic = time.perf_counter()
        out = method(self, images)
        seconds.append(time.perf_counter() - tic)
        return out

    return encode_images


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def embed_job(
    root: Path, teacher: Path, cache_dir: Path, batch_size: int, workers: int, seed: int
) -> dict:
    """images/s of `embed_dataset`: steady (after the first batch, from its progress callback)
    and end to end (the whole call)."""
    index = scan_dataset(root)  # as `vl2v embed` does before embedding; not timed
    cfg = EmbedConfig(teacher=f"{teacher}:random", batch_size=batch_size, workers=workers, device="cpu")
    ticks: list[tuple[float, float, int]] = []  # wall, CPU (this process), images done
    load = [os.getloadavg()[0]]
    forward: list[float] = []  # seconds in Teacher.encode_images, per batch

    def progress(done: int, total: int) -> None:
        ticks.append((time.perf_counter(), time.process_time(), done))

    torch.manual_seed(seed)  # the same weights as the bare model
    workers_cpu = _children_cpu()
    tic = time.perf_counter()
    with mock.patch.object(Teacher, "encode_images", _timed(Teacher.encode_images, forward)):
        report = embed_dataset(index, cache_dir, cfg, progress=progress)
    wall = time.perf_counter() - tic
    workers_cpu = _children_cpu() - workers_cpu  # decoding workers, reaped at each shard's end
    load.append(os.getloadavg()[0])
    (t1, c1, n1), (tk, ck, nk) = ticks[0], ticks[-1]
    rows = {p: i for i, p in enumerate(f.path for f in index.files)}
    return {
        "images_per_s": (nk - n1) / (tk - t1),
        "end_to_end_images_per_s": report.embedded / wall,
        # Steady CPU per image: this process between the same batches, plus the workers' decoding
        # spread evenly over the images.
        "cpu_seconds_per_image": (ck - c1) / (nk - n1) + workers_cpu / report.embedded,
        "workers_cpu_seconds": workers_cpu,
        # Decoding CPU over the main process's CPU, per image: on a machine with no core to spare
        # (here: 2 torch threads + workers on 2 cores) the workers take this from the forward.
        "decode_cpu_share": workers_cpu / report.embedded / ((ck - c1) / (nk - n1)),
        "wall_seconds": wall,
        # Share of the steady wall time spent in the teacher forward: the same ratio as
        # embed / bare, but measured in one run, so it does not drift with the machine's load.
        "forward_share": sum(forward[1:]) / (tk - t1),
        "batch_forward_seconds": forward,
        "seconds_to_first_batch": t1 - tic,  # teacher build, text prompts, workers, first batch
        "loadavg_1min": load,
        "workers": cfg.workers,
        "embedded": report.embedded,
        "targets": load_targets(cache_dir, index).image,
        "rows": rows,
    }


def bench_throughput(args, tmp: Path) -> dict:
    if args.images < 2 * args.batch_size:
        raise SystemExit("--images must be ≥ 2 × --batch-size: the first batch is the warm-up.")
    root = make_images(tmp / "data", args.images, args.px, args.seed)
    config = open_clip.get_model_config(args.model)
    teacher = write_teacher_config(tmp, f"{args.model}-bench", config)
    paths = sorted(root.rglob("*.jpg"))
    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    model.eval()
    batches = list(torch.stack([preprocess(load_rgb(p)) for p in paths]).split(args.batch_size))
    # Bare runs before and after the embed job, so that load drift on a shared machine is
    # bracketed rather than charged to one side.
    bare = [bare_forward(model, batches)]
    embed = embed_job(root, teacher, tmp / "cache", args.batch_size, args.workers, args.seed)
    bare.append(bare_forward(model, batches))
    # The cache is in dataset order; bare ran in sorted-path order: line them up to compare.
    rows = embed.pop("rows")
    order = [rows[p.relative_to(root).as_posix()] for p in paths]
    diff = float((embed.pop("targets")[order] - bare[0]["embeddings"]).abs().max())
    for run in bare:
        run.pop("embeddings")
    timed = 2 * sum(len(b) for b in batches[1:])
    bare_rate = timed / sum(sum(run["batch_seconds"][1:]) for run in bare)
    ratio = embed["images_per_s"] / bare_rate
    bare_cpu = sum(run["cpu_seconds_per_image"] for run in bare) / len(bare)
    return {
        "model": args.model,
        "images": args.images,
        "image_px": args.px,
        "batch_size": args.batch_size,
        "bare_images_per_s": bare_rate,  # both runs together
        "bare_cpu_seconds_per_image": bare_cpu,
        "bare_runs": bare,
        "embed": embed,
        "ratio_embed_over_bare": ratio,
        "ratio_in_run": embed["forward_share"],
        "ratio_cpu": bare_cpu / embed["cpu_seconds_per_image"],
        # Embed's wall time outside the forward, and the decoding CPU the forward loses to the
        # workers: both measured within the embed run, so no drift between runs enters.
        "ratio_estimate": embed["forward_share"] / (1 + embed["decode_cpu_share"]),
        "ratio_end_to_end_over_bare": embed["end_to_end_images_per_s"] / bare_rate,
        "max_abs_diff_embeddings": diff,  # fp16 storage: ~1e-3 means the same network ran
        "target_met": ratio >= 0.9,
        "target_met_estimate": embed["forward_share"] / (1 + embed["decode_cpu_share"]) >= 0.9,
    }


# --- memory ----------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Phase:
    """Peak RSS (VmHWM, reset at the start) and, if traced, the Python-side peak of a phase."""

    def __init__(self, trace: bool):
        self.trace = trace

    def __enter__(self):
        self.start_rss = _status_kb("VmRSS") / 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        if self.trace:
            tracemalloc.reset_peak()
            self.start_py = tracemalloc.get_traced_memory()[0] / 2**20
        return self

    def __exit__(self, *exc):
        self.peak_rss = _status_kb("VmHWM") / 1024
        if self.trace:
            self.peak_py = tracemalloc.get_traced_memory()[1] / 2**20

    def figures(self) -> dict:
        out = {"start_rss_mb": self.start_rss, "peak_rss_mb": self.peak_rss,
               "extra_rss_mb": self.peak_rss - self.start_rss}
        if self.trace:
            out["extra_python_mb"] = self.peak_py - self.start_py
        return out


def memory_child(
    root: str, teacher: str, cache_dir: str, batch_size: int, workers: int, trace: bool
) -> None:
    """In a fresh process, as `vl2v embed`: scan (decoding every image), then embed_dataset.
    Prints each phase's peak RSS and how far it rose over the RSS the phase started at."""
    logging.getLogger().setLevel(logging.ERROR)
    if trace:
        tracemalloc.start()
    with Phase(trace) as scan:
        index = scan_dataset(root)
    cfg = EmbedConfig(teacher=f"{teacher}:random", batch_size=batch_size, workers=workers, device="cpu")
    with Phase(trace) as embed:
        report = embed_dataset(index, Path(cache_dir), cfg)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": report.embedded, "scan": scan.figures(), "embed": embed.figures(),
                      "workers_peak_rss_mb": children}))


def run_child(root: Path, teacher: Path, cache_dir: Path, args, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(root), str(teacher), str(cache_dir),
           "--batch-size", str(args.memory_batch_size), "--threads", str(torch.get_num_threads())]
    cmd += ["--workers", str(args.workers)] if args.workers is not None else []
    cmd += ["--trace"] if trace else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(args, tmp: Path) -> dict:
    teacher = write_teacher_config(tmp, "tiny-vit-bench", TINY_VIT)
    sizes = {}
    for n in args.memory_sizes:
        root = make_images(tmp / f"mem{n}", n, args.memory_px, args.seed)
        load = os.getloadavg()[0]
        rss = run_child(root, teacher, tmp / f"mem{n}-cache", args, trace=False)
        traced = run_child(root, teacher, tmp / f"mem{n}-cache-traced", args, trace=True)
        for phase in ("scan", "embed"):
            rss[phase]["extra_python_mb"] = traced[phase]["extra_python_mb"]
        sizes[n] = {**rss, "process_peak_rss_mb": max(rss["scan"]["peak_rss_mb"],
                                                      rss["embed"]["peak_rss_mb"]),
                    "loadavg_1min": load}
        e, sc = rss["embed"], rss["scan"]
        print(f"  {n:>6} images: embed_dataset peak RSS {e['peak_rss_mb']:.0f} MB "
              f"(+{e['extra_rss_mb']:.0f} MB over its start, "
              f"Python +{e['extra_python_mb']:.1f} MB); "
              f"scan +{sc['extra_rss_mb']:.0f} MB (Python +{sc['extra_python_mb']:.1f} MB)",
              flush=True)
    lo, hi = min(sizes), max(sizes)
    small, large = sizes[lo], sizes[hi]

    def per_image_kb(phase: str, key: str) -> float:
        return (large[phase][key] - small[phase][key]) * 1024 / (hi - lo)

    ratio = large["embed"]["peak_rss_mb"] / small["embed"]["peak_rss_mb"]
    return {
        "teacher_config": TINY_VIT,
        "image_px": args.memory_px,
        "batch_size": args.memory_batch_size,
        "sizes": sizes,
        "ratio_embed_peak_rss": ratio,
        "ratio_embed_extra_rss": large["embed"]["extra_rss_mb"] / small["embed"]["extra_rss_mb"],
        "ratio_process_peak_rss": large["process_peak_rss_mb"] / small["process_peak_rss_mb"],
        # Slopes between the two sizes: what each further image costs, to extrapolate from.
        "embed_rss_kb_per_image": per_image_kb("embed", "extra_rss_mb"),
        "embed_python_kb_per_image": per_image_kb("embed", "extra_python_mb"),
        "scan_rss_kb_per_image": per_image_kb("scan", "extra_rss_mb"),
        "scan_python_kb_per_image": per_image_kb("scan", "extra_python_mb"),
        "target_met": ratio <= 1.1,
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=256, help="throughput test images (0: skip)")
    p.add_argument("--batch-size", type=int, default=32, help="teacher batch size, both sides")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    p.add_argument("--px", type=int, default=256, help="side of the throughput JPEGs")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (EmbedConfig's)")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[1000, 10000],
                   help="image counts of the memory test (none: skip)")
    p.add_argument("--memory-px", type=int, default=64, help="side of the memory-test JPEGs")
    p.add_argument("--memory-batch-size", type=int, default=EmbedConfig.batch_size)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = EmbedConfig.workers
    return args


def report(result: dict) -> None:
    t, m = result.get("throughput"), result.get("memory")
    if t:
        embed = t["embed"]
        print(f"throughput {t['model']} {t['images']} images, batch {t['batch_size']}: "
              f"bare {t['bare_images_per_s']:.3f} img/s, embed {embed['images_per_s']:.3f} img/s "
              f"(end to end {embed['end_to_end_images_per_s']:.3f}) -> "
              f"ratio {t['ratio_embed_over_bare']:.3f}, "
              f"in-run forward share {t['ratio_in_run']:.3f}, decode CPU share "
              f"{embed['decode_cpu_share']:.3f}, estimate {t['ratio_estimate']:.3f}, "
              f"CPU-time ratio {t['ratio_cpu']:.3f} "
              f"(target >= 0.9: wall {'met' if t['target_met'] else 'NOT met'}, estimate "
              f"{'met' if t['target_met_estimate'] else 'NOT met'}); "
              f"max |diff| {t['max_abs_diff_embeddings']:.1e}")
    if m:
        print(f"memory: embed_dataset peak RSS ratio {m['ratio_embed_peak_rss']:.3f} "
              f"(its rise over its start: ratio {m['ratio_embed_extra_rss']:.2f}, "
              f"{m['embed_rss_kb_per_image']:.2f} KB/image RSS, "
              f"{m['embed_python_kb_per_image']:.2f} KB/image Python); scan "
              f"{m['scan_rss_kb_per_image']:.2f} KB/image RSS; whole process peak ratio "
              f"{m['ratio_process_peak_rss']:.3f} "
              f"(target flat: {'met' if m['target_met'] else 'NOT met'})")
    print(f"load average {result['environment']['loadavg_start']} -> {result['loadavg_end']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    if args.memory_child:
        return memory_child(*args.memory_child, args.batch_size, args.workers, args.trace)
    result = {"settings": settings(args), "environment": environment("open_clip")}
    with tempfile.TemporaryDirectory(prefix="vl2v-bench-embed-") as tmp:
        if args.images:
            result["throughput"] = bench_throughput(args, Path(tmp))
        if args.memory_sizes:
            result["memory"] = bench_memory(args, Path(tmp))
    result["loadavg_end"] = os.getloadavg()
    report(result)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
