"""How the demo's training settings were chosen: each variant trained on the demo's own data, teacher,
pretrained student and views cache (those of `make demo`, reused from --workdir, built when missing),
and judged by the training domains' validation accuracy alone (never a held-out domain's figure).

A variant is a set of `vl2v.demo.run.DemoConfig` / `TrainConfig` overrides of the settings as they
were when the choice was made (BEFORE: Align 26 steps at lr 1e-3 validated every 25, no warm-up),
and may continue another variant's Align. Printed and written to JSON per variant and method: the
validation accuracy (mean over the four held-out runs of the training domains' out-split accuracy)
of the training-domain-validation model and of the SWAD model.

    .venv/bin/python bench/demo_settings.py                         # every variant: about an hour on 2 cores
    .venv/bin/python bench/demo_settings.py align-500 distill       # some (a continued Align is trained first)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from common import environment, start, write_result
from vl2v import pipeline
from vl2v.config import TrainConfig
from vl2v.data import scan_dataset
from vl2v.demo.digits import build_digits_dg
from vl2v.demo.pretrain import PretrainRecipe, pretrain_demo_student
from vl2v.demo.run import DemoConfig
from vl2v.demo.teacher import TeacherRecipe, train_demo_teacher
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.methods import get_method

BEFORE = {"align_steps": 26, "align_lr": 1e-3, "align_checkpoint_freq": 25, "warmup_steps": 0}
ALIGN_500 = {"align_steps": 500, "align_lr": 3e-3}
# name -> (methods, overrides, the variant whose Align a Distill continues)
VARIANTS = {
    "align-26": (["align"], {}, None),
    "align-200-lr-1e-3": (["align"], {"align_steps": 200}, None),
    "align-200-lr-1e-2": (["align"], {"align_steps": 200, "align_lr": 1e-2}, None),
    "align-500": (["align"], ALIGN_500, None),
    "align-1000": (["align"], {**ALIGN_500, "align_steps": 1000}, None),
    "distill": (["distill"], {}, "align-500"),
    "distill-lr-2e-3": (["distill"], {"lr": 2e-3}, "align-500"),
    "distill-lr-5e-4": (["distill"], {"lr": 5e-4}, "align-500"),
    "distill-lmd-0.8": (["distill"], {"lmd": 0.8}, "align-500"),
    "distill-lmd-1.0": (["distill"], {"lmd": 1.0}, "align-500"),
    "distill-warmup": (["distill"], {"warmup_steps": 10}, "align-500"),
    "distill-warmup-lmd-0.8": (["distill"], {"warmup_steps": 10, "lmd": 0.8}, "align-500"),
    "kd": (["kd"], {}, None),
    "kd-warmup": (["kd"], {"warmup_steps": 10}, None),
    "kd-warmup-weight-0.8": (["kd"], {"warmup_steps": 10, "kd_weight": 0.8}, None),
    "erm": (["erm"], {}, None),
    "erm-warmup": (["erm"], {"warmup_steps": 10}, None),
}
SELECTIONS = ("training-domain validation", "SWAD")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help=f"variants to train (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--workdir", type=Path, default=Path("demo"), help="the demo's folder (make demo's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def demo_inputs(cfg: DemoConfig) -> dict:
    """The demo's data, teacher, pretrained student and views cache, as `vl2v demo` builds them."""
    work = Path(cfg.workdir)
    root = build_digits_dg(work / "data", cfg.per_class, cfg.seed)
    config_json, weights = train_demo_teacher(work / "teacher", cfg.seed, None, TeacherRecipe(**cfg.teacher))
    student = pretrain_demo_student(work / "student", cfg.seed, None, PretrainRecipe(student=cfg.student, **cfg.pretrain))
    teacher = f"{config_json}:{weights}"
    index = scan_dataset(root)
    cache_dir = pipeline.teacher_cache_dir(index.name, teacher)
    embed_dataset(index, cache_dir, EmbedConfig(teacher=teacher, workers=cfg.workers, batch_size=256, views=cfg.views))
    return {"root": root, "teacher": teacher, "student": student, "cache": cache_dir}


def train_variant(name: str, inputs: dict, workdir: Path) -> dict:
    """Train a variant's methods (its continued Align first); their validation figures."""
    methods, overrides, continues = VARIANTS[name]
    if continues:
        train_variant(continues, inputs, workdir)
    demo_fields = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(workdir=workdir, **{k: v for k, v in {**BEFORE, **overrides}.items() if k in demo_fields})
    extra = {k: v for k, v in overrides.items() if k not in demo_fields}
    figures = {}
    for method in methods:
        flags = {**cfg.train_flags(method, Path(inputs["student"])), **extra}
        start_method = get_method(method).starts_from
        from_run = workdir / "settings" / continues / start_method if start_method else None
        tic = time.perf_counter()
        _, finals = pipeline.train(Path(inputs["root"]), TrainConfig(method=method, **flags), workdir / "settings" / name / method,
                                   Path(inputs["cache"]), inputs["teacher"], from_run)
        figures[method] = {sel: round(100 * sum(f[sel]["tr_outacc"] for f in finals.values()) / len(finals), 1) for sel in SELECTIONS}
        figures[method]["seconds"] = round(time.perf_counter() - tic, 1)
    return figures


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    inputs = demo_inputs(DemoConfig(workdir=args.workdir))
    result = {"settings": {"before": BEFORE, "variants": args.variants or list(VARIANTS)}, "environment": environment("timm", "open_clip"), "variants": {}}
    for name in args.variants or VARIANTS:
        result["variants"][name] = train_variant(name, inputs, args.workdir)
        for method, f in result["variants"][name].items():
            print(f"{name:24s} {method:8s} validation {f[SELECTIONS[0]]:.1f} / SWAD {f['SWAD']:.1f}  ({f['seconds']:.0f} s)", flush=True)
    write_result({**result, "inputs": inputs}, args.out)


if __name__ == "__main__":
    main()
