"""Benchmark of deployment (issue #13): CPU latency per image at batch 1 and throughput at batch 32
of one student run four ways, in one process, on the same inputs:
  eager        the torch module `vl2v.export.ExportedStudent` (logits and embedding) under inference_mode;
  torchscript  its bundle, run by `vl2v.bundle` on torch.jit (as `vl2v predict` runs it);
  onnx         its bundle on onnxruntime;
  onnx-int8    its bundle after onnxruntime's dynamic int8 quantisation (`--quantize int8`: the
               matrix products; convolutions stay fp32).
Random weights (pretrained=False) and a text head over --classes random class embeddings; the
bundles are written by `vl2v.export.write_bundle`, as `vl2v export` writes them. Inputs are
preprocessed random tensors, so image decoding (the same for every variant) is excluded; the
end-to-end rate of `vl2v.bundle.run_bundle` over JPEGs (decoding threads included) is reported
beside. Calls interleave: every round times one call of each variant, each round in another
order, so load drift on a shared machine hits all alike; figures are medians over rounds.
Torch and onnxruntime use the same thread count (--threads; the bundle runtime follows torch's).

    .venv/bin/python bench/predict.py                                  # resnet18, 224 px, 1 thread
    .venv/bin/python bench/predict.py --student resnet10t --rounds 5   # quicker
    .venv/bin/python bench/predict.py --student vit_small_patch16_224 --threads 2

Parity is reported too: each bundle's max |logits − eager logits| and top-1 agreement with the
eager model on the batch-32 input (fp32 bundles: ≤ 1e-4 expected; int8: close, not equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import environment, settings, start, write_result
from vl2v.bundle import Preprocessing, load_bundle, run_bundle
from vl2v.export import ExportedStudent, write_bundle
from vl2v.student import create_student

BUNDLES = {"torchscript": ("torchscript", None), "onnx": ("onnx", None), "onnx-int8": ("onnx", "int8")}
VARIANTS = ("eager", *BUNDLES)


def randomise_norms(model: torch.nn.Module) -> None:
    """BatchNorm weights and statistics drawn at random, as a trained network's: timm zero-initialises
    each ResNet block's last BatchNorm, which makes the blocks constant and lets the ONNX exporter
    share their all-zero folded weights (a smaller file than a trained model's)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def build(args, folder: Path) -> tuple[dict, dict]:
    """The eager student and its three bundles: ({variant: callable on [B, 3, H, W] float32}, bundles)."""
    torch.manual_seed(args.seed)
    text = F.normalize(torch.randn(args.classes, args.embed_dim), dim=-1)
    student, data_cfg = create_student(args.student, "text", args.classes, text, 100.0, pretrained=False, image_size=args.image_size)
    randomise_norms(student)
    exported = ExportedStudent(student).eval()
    preprocessing = Preprocessing(data_cfg.image_size, tuple(data_cfg.mean), tuple(data_cfg.std))
    classes = [f"class{i}" for i in range(args.classes)]
    bundles, export_seconds = {}, {}
    for name, (fmt, quantize) in BUNDLES.items():
        tic = time.perf_counter()
        write_bundle(student, preprocessing, classes, {"model": "random", "student": args.student}, folder / name, fmt, quantize)
        export_seconds[name] = time.perf_counter() - tic
        bundles[name] = load_bundle(folder / name, device="cpu")

    def eager(images: np.ndarray):
        with torch.inference_mode():
            logits, embedding = exported(torch.from_numpy(images))
        return logits.numpy(), embedding.numpy()

    sizes = {name: (folder / name / b.info["model_file"]).stat().st_size / 2**20 for name, b in bundles.items()}
    return {"eager": eager, **bundles}, {"bundles": bundles, "export_seconds": export_seconds, "model_mb": sizes, "image_size": data_cfg.image_size}


def timed_rounds(runners: dict, images: np.ndarray, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant on `images`, interleaved, each round in a rotated order."""
    seconds = {name: [] for name in runners}
    for r in range(warmup + rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            tic = time.perf_counter()
            runners[name](images)
            if r >= warmup:
                seconds[name].append(time.perf_counter() - tic)
    return seconds


def parity(runners: dict, images: np.ndarray) -> dict:
    reference = runners["eager"](images)[0]
    out = {}
    for name in BUNDLES:
        logits = runners[name](images)[0]
        out[name] = {"max_abs_diff_logits": float(np.abs(logits - reference).max()),
                     "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}
    return out


def end_to_end(bundles: dict, folder: Path, args) -> dict:
    """images/s of `run_bundle` over JPEGs (decoding threads, preprocessing, model), after one warm-up pass."""
    rng = np.random.default_rng(args.seed)
    paths = []
    for i in range(args.jpegs):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (args.jpeg_px, args.jpeg_px, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    rates = {}
    for name, bundle in bundles.items():
        run_bundle(bundle, paths[: args.batch_size], args.batch_size, args.workers)
        tic = time.perf_counter()
        run_bundle(bundle, paths, args.batch_size, args.workers)
        rates[name] = len(paths) / (time.perf_counter() - tic)
    return rates


def bench(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="vl2v-bench-predict-") as tmp:
        runners, built = build(args, Path(tmp))
        rng = np.random.default_rng(args.seed)
        size = built["image_size"]
        batch = rng.standard_normal((args.batch_size, 3, size, size), dtype=np.float32)
        single = batch[:1].copy()
        latency = timed_rounds(runners, single, args.rounds * 4, args.warmup)
        throughput = timed_rounds(runners, batch, args.rounds, args.warmup)
        rates = end_to_end(built["bundles"], Path(tmp), args) if args.jpegs else {}
        checks = parity(runners, batch)
    figures = {}
    for name in VARIANTS:
        figures[name] = {
            "latency_ms_batch1": 1000 * statistics.median(latency[name]),
            f"images_per_s_batch{args.batch_size}": args.batch_size / statistics.median(throughput[name]),
            "latency_seconds": latency[name],
            "throughput_seconds": throughput[name],
        }
        if name in BUNDLES:
            figures[name].update(model_mb=built["model_mb"][name], export_seconds=built["export_seconds"][name], **checks[name])
            if name in rates:
                figures[name]["end_to_end_images_per_s"] = rates[name]
    eager = figures["eager"]
    for name in BUNDLES:
        figures[name]["latency_speedup"] = eager["latency_ms_batch1"] / figures[name]["latency_ms_batch1"]
        figures[name]["throughput_speedup"] = figures[name][f"images_per_s_batch{args.batch_size}"] / eager[f"images_per_s_batch{args.batch_size}"]
    return {"student": args.student, "image_size": size, "batch_size": args.batch_size, "variants": figures}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18", help="timm model (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=7, help="classes of the text head (PACS: 7)")
    p.add_argument("--embed-dim", type=int, default=512, help="teacher embedding width (ViT-B/16: 512)")
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds at the throughput batch (×4 at batch 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--jpegs", type=int, default=64, help="JPEGs for the end-to-end rate (0: skip)")
    p.add_argument("--jpeg-px", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="decoding threads of the end-to-end rate")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime compute threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    return p.parse_args(argv)


def report(result: dict) -> None:
    b = result["batch_size"]
    print(f"{result['student']} at {result['image_size']} px, {result['environment']['threads']} thread(s):")
    for name, f in result["variants"].items():
        line = f"  {name:<12} batch 1 {f['latency_ms_batch1']:8.2f} ms/image   batch {b} {f[f'images_per_s_batch{b}']:8.2f} images/s"
        if name != "eager":
            line += (f"   ({f['latency_speedup']:.2f}× / {f['throughput_speedup']:.2f}× eager; {f['model_mb']:.1f} MB; "
                     f"max |Δ logits| {f['max_abs_diff_logits']:.1e}, top-1 agreement {f['top1_agreement']:.3f}")
            line += f"; predict over JPEGs {f['end_to_end_images_per_s']:.2f} images/s)" if "end_to_end_images_per_s" in f else ")"
        print(line)
    print(f"load average {result['environment']['loadavg_start']} -> {result['loadavg_end']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    result = {"settings": settings(args), "environment": environment("timm", "onnxruntime")}
    result.update(bench(args))
    result["loadavg_end"] = os.getloadavg()
    report(result)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
