"""How robust the demo's teacher recipe is (issue #11): the demo teacher trained with several seeds,
each with its training time, its zero-shot accuracy on the teacher's own validation images (what
the recipe was chosen by) and on the demo's held-out domains (each domain's DomainBed "in" split of
trial seed 0, computed from the embedding cache as `vl2v demo` reports it).

    .venv/bin/python bench/demo_teacher.py                    # seeds 0, 1, 2: ~6 min on 2 idle cores
    .venv/bin/python bench/demo_teacher.py --seeds 3 --recipe '{"lr": 0.002}'

One torch thread (`--threads`), as the demo. Teachers, data and caches go to `--workdir` (default: a
temporary folder); a teacher already trained there with the same parameters is reused, and then
its time is not measured again (`trained_now` says which).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common import environment, start, write_result
from vl2v.cache import load_targets
from vl2v.data import all_splits, scan_dataset
from vl2v.demo import digits
from vl2v.demo.teacher import TeacherRecipe, train_demo_teacher
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.evaluate import teacher_zero_shot


def one_seed(work: Path, data_root: Path, seed: int, recipe: TeacherRecipe) -> dict:
    """Train (or reuse) the teacher of `seed`; its times and zero-shot accuracies (%)."""
    start, wall, cpu = time.time(), time.perf_counter(), time.process_time()
    config_json, weights = train_demo_teacher(work / f"teacher-seed{seed}", seed, recipe=recipe)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    meta = json.loads(weights.with_suffix(".meta.json").read_text())
    index = scan_dataset(data_root)
    cache = work / "cache" / weights.stem
    spec = f"{config_json}:{weights}"
    embed_dataset(index, cache, EmbedConfig(teacher=spec, workers=0, batch_size=256, device="cpu"))
    splits = all_splits(index, trial_seed=0)
    held_in = {d: splits[f"env{i}_in"] for i, d in enumerate(index.domains)}
    held_out = teacher_zero_shot(load_targets(cache, index), index, held_in)
    pct = lambda accs: {k: round(100 * v, 1) for k, v in accs.items()}  # noqa: E731
    return {
        "seed": seed,
        "weights": str(weights),
        "trained_now": weights.stat().st_mtime >= start,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "train_seconds": meta["train_seconds"],
        "final_loss": meta["final_loss"],
        "logit_scale": meta["logit_scale"],
        "validation": pct(meta["validation"]),
        "validation_avg": round(100 * float(np.mean(list(meta["validation"].values()))), 1),
        "held_out_in_split": pct(held_out),
        "held_out_avg": round(100 * float(np.mean(list(held_out.values()))), 1),
        "loadavg_end": os.getloadavg(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--recipe", type=json.loads, default={}, help="TeacherRecipe overrides (JSON)")
    p.add_argument("--per-class", type=int, default=100, help="demo images per class and domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    recipe = TeacherRecipe(**args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data_root = digits.build_digits_dg(work / "data", args.per_class, seed=0)
        env = environment("open_clip")
        rows = []
        for seed in args.seeds:
            rows.append(one_seed(work, data_root, seed, recipe))
            r = rows[-1]
            print(f"seed {seed}: validation {r['validation_avg']:.1f}% {r['validation']}, held-out "
                  f"{r['held_out_avg']:.1f}% {r['held_out_in_split']}, trained in {r['train_seconds']:.0f} s "
                  f"(cpu {r['cpu_seconds']:.0f} s, load {r['loadavg_end'][0]:.1f})", flush=True)  # fmt: skip
    spread = {k: round(max(r[k] for r in rows) - min(r[k] for r in rows), 1) for k in ("validation_avg", "held_out_avg")}
    print(f"spread over seeds (max - min): validation {spread['validation_avg']} points, held-out {spread['held_out_avg']} points")
    result = {"settings": {"recipe": asdict(recipe), "seeds": args.seeds, "per_class": args.per_class},
              "environment": env, "seeds": rows, "spread": spread}  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
