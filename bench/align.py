"""Benchmark of fast Align (issue #10): Align's wall time with the featurizer's features computed
once (`--fast-align auto`) against the featurizer run at every step (`--fast-align off`), with the
same settings, in one run.

Both are the library's `vl2v.pipeline.train` (what `vl2v align` runs) on the same views cache:
a dataset of random JPEGs made in a temporary folder, embedded with `vl2v.embed.embed_dataset`
(`--views K`) by a small random open_clip teacher (the teacher's cost is not what is measured).
The student is a random-weight timm featurizer (default `vit_small_patch16_224`, ViT-S at 224 px,
frozen, no BatchNorm: fast Align applies). One held-out domain; the other domains' "in" images are
drawn, `--batch-size` per domain and step. Per-step Align decodes, renders and runs the featurizer
on every batch and every evaluation image at each checkpoint; fast Align renders and runs it once
per (training image, view) and once per evaluation image, then trains the projection on those.
The wall and CPU time of each whole run are reported, their ratio, and how far the two runs' records
and weights differ (they must agree to 1e-5).

    .venv/bin/python bench/align.py                                 # 48 images × 4 views, 200 steps
    .venv/bin/python bench/align.py --steps 50 --checkpoint-freq 25 # quicker

Target: per-step / fast wall time ≥ 20 for a ViT-S- or ResNet-50-sized featurizer at 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from common import environment, settings, start, write_result
from vl2v import pipeline, runs
from vl2v.config import TrainConfig
from vl2v.data import scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.runtime import load_checkpoint

# A small teacher: the views cache is the input of the benchmark, not what it measures.
TEACHER = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def make_dataset(root: Path, domains: int, classes: int, per_class: int, px: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for d in range(domains):
        for c in range(classes):
            folder = root / f"domain{d}" / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = (rng.random((px, px, 3)) * 160 + rng.integers(0, 96, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.jpg", quality=90)
    return root


def write_teacher(folder: Path) -> str:
    config = folder / "bench-teacher.json"
    config.write_text(json.dumps(TEACHER))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = folder / "bench-teacher.pt"
    torch.save(open_clip.create_model("bench-teacher").state_dict(), weights)
    return f"{config}:{weights}"


def timed_run(root: Path, cache: Path, run_dir: Path, cfg: TrainConfig) -> dict:
    tic, cpu = time.perf_counter(), time.process_time()
    _, finals = pipeline.train(root, cfg, run_dir, cache)
    return {"wall_seconds": time.perf_counter() - tic, "cpu_seconds": time.process_time() - cpu, "finals": finals}


def differences(fast_dir: Path, step_dir: Path, env: str) -> dict:
    """The largest absolute differences between the two runs' records and weights."""
    strip = ("step_time", "kind", "selection", "test_domain")
    a, b = runs.read_records(fast_dir / env), runs.read_records(step_dir / env)
    record_diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k not in strip and isinstance(x[k], float))
    weight_diff = 0.0
    for name in ("best.pt", "swad.pt"):
        wa, wb = load_checkpoint(fast_dir / env / name), load_checkpoint(step_dir / env / name)
        weight_diff = max(weight_diff, *(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa))
    return {"records": len(a), "max_abs_diff_records": record_diff, "max_abs_diff_weights": weight_diff}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="vit_small_patch16_224", help="timm name (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--domains", type=int, default=4, help="one is held out")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--per-class", type=int, default=4, help="images per domain and class (48 in all by default)")
    p.add_argument("--px", type=int, default=256, help="side of the JPEGs")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint-freq", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="images per training domain per step")
    p.add_argument("--workers", type=int, default=0, help="decoding workers, both runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    env = environment("timm")
    with tempfile.TemporaryDirectory(prefix="vl2v-bench-align-") as tmp:
        tmp = Path(tmp)
        root = make_dataset(tmp / "data", args.domains, args.classes, args.per_class, args.px, args.seed)
        index = scan_dataset(root)
        cache = tmp / "cache"
        embed_dataset(index, cache, EmbedConfig(teacher=write_teacher(tmp), views=args.views, workers=0, device="cpu", batch_size=64))
        base = dict(method="align", student=args.student, pretrained=False, image_size=args.image_size, steps=args.steps,
                    checkpoint_freq=args.checkpoint_freq, batch_size=args.batch_size, workers=args.workers, device="cpu",
                    test_envs=(index.domains[0],), seed=args.seed)
        print(f"align: {args.student} at {args.image_size} px, {len(index.files)} images × {args.views} views, {args.steps} steps of "
              f"{args.domains - 1} × {args.batch_size}, validation every {args.checkpoint_freq}, {torch.get_num_threads()} threads", flush=True)
        per_step = timed_run(root, cache, tmp / "per-step", TrainConfig(**base, fast_align="off"))
        print(f"  per-step: {per_step['wall_seconds']:.1f} s (cpu {per_step['cpu_seconds']:.1f} s), load {os.getloadavg()[0]:.2f}", flush=True)
        fast = timed_run(root, cache, tmp / "fast", TrainConfig(**base, fast_align="auto"))
        print(f"  fast:     {fast['wall_seconds']:.1f} s (cpu {fast['cpu_seconds']:.1f} s), load {os.getloadavg()[0]:.2f}", flush=True)
        assert (tmp / "fast" / "features").is_dir() and not (tmp / "per-step" / "features").exists()
        diff = differences(tmp / "fast", tmp / "per-step", "env0")
    ratio = per_step["wall_seconds"] / fast["wall_seconds"]
    result = {
        "settings": settings(args),
        "environment": {**env, "loadavg_end": os.getloadavg()},
        "per_step": {k: v for k, v in per_step.items() if k != "finals"},
        "fast": {k: v for k, v in fast.items() if k != "finals"},
        "ratio_wall": ratio,
        "ratio_cpu": per_step["cpu_seconds"] / fast["cpu_seconds"],
        **diff,
        "target_met": ratio >= 20,
        "equal_to_1e-5": diff["max_abs_diff_records"] <= 1e-5 and diff["max_abs_diff_weights"] <= 1e-5,
    }
    print(f"per-step / fast: wall {ratio:.1f}× (target >= 20: {'met' if result['target_met'] else 'NOT met'}), cpu {result['ratio_cpu']:.1f}×; "
          f"max |diff| over {diff['records']} records {diff['max_abs_diff_records']:.1e}, weights {diff['max_abs_diff_weights']:.1e}")
    print(f"load average {env['loadavg_start']} -> {result['environment']['loadavg_end']}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
