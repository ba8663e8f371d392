"""Benchmark of the black-box teacher (issue #12): embedding throughput through `vl2v serve-teacher`
on loopback against the local teacher, same model, same machine, same images.

One open_clip teacher (default ViT-B-16, 224 px) with seeded random weights saved to a file, so
that the local spec `CONFIG.json:WEIGHTS.pt` and the server are the same teacher (one identity):
  local   `embed_dataset` with `--teacher CONFIG.json:WEIGHTS.pt` (decoding workers, forward, HDF5)
  remote  `embed_dataset` with `--teacher http://127.0.0.1:PORT` against a `vl2v serve-teacher`
          subprocess of the same spec (the server decodes and runs the forward; the client sends
          files, `--in-flight` requests at a time, and writes shards)
Both skip their first batch (warm-up, and for the server its start-up) and are timed through the
progress callback; local runs once before and once after remote, so that load drift on a shared
machine is bracketed. Forward batches are the same size on both sides (the server's --batch-size
is the client's). The server starts before the timed run; its start-up is not counted.

    .venv/bin/python bench/remote.py                                  # 128 images, batch 16
    .venv/bin/python bench/remote.py --images 48 --batch-size 8       # quicker

Target: remote ≥ 0.8 × local (images/s). The two caches must hold the same embeddings (fp16).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import open_clip
import torch

from common import environment, settings, start, write_result
from embed import make_images, write_teacher_config
from vl2v.cache import load_targets
from vl2v.data import scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.ledger import account_id, read_ledger
from vl2v.protocol import INFO

TOKEN = "bench"


def save_teacher(folder: Path, model: str, seed: int) -> str:
    """A `CONFIG.json:WEIGHTS.pt` spec of `model` with seeded random weights."""
    config = write_teacher_config(folder, f"{model}-bench", open_clip.get_model_config(model))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    weights = folder / f"{model}-bench.pt"
    torch.save(open_clip.create_model(config.stem).state_dict(), weights)
    return f"{config}:{weights}"


def timed_embed(index, cache_dir: Path, cfg: EmbedConfig) -> dict:
    """images/s of `embed_dataset`: steady (after the first answer) and end to end."""
    ticks: list[tuple[float, int]] = []
    load = [os.getloadavg()[0]]
    tic = time.perf_counter()
    report = embed_dataset(index, cache_dir, cfg, progress=lambda done, total: ticks.append((time.perf_counter(), done)))
    wall = time.perf_counter() - tic
    load.append(os.getloadavg()[0])
    (t1, n1), (tk, nk) = ticks[0], ticks[-1]
    return {
        "images_per_s": (nk - n1) / (tk - t1),
        "end_to_end_images_per_s": report.embedded / wall,
        "wall_seconds": wall,
        "seconds_to_first_batch": t1 - tic,
        "embedded": report.embedded,
        "cost": report.cost,
        "loadavg_1min": load,
    }


def start_server(spec: str, ledger: Path, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vl2v", "serve-teacher", spec, "--port", str(port), "--token", TOKEN, "--ledger", str(ledger),
           "--device", "cpu", "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            httpx.get(url + INFO, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).raise_for_status()
            return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the teacher server did not start")


def bench(args, tmp: Path) -> dict:
    if args.images < 2 * args.batch_size:
        raise SystemExit("--images must be ≥ 2 × --batch-size: the first batch is the warm-up.")
    index = scan_dataset(make_images(tmp / "data", args.images, args.px, args.seed))
    spec = save_teacher(tmp, args.model, args.seed)
    local_cfg = EmbedConfig(teacher=spec, batch_size=args.batch_size, workers=args.workers, device="cpu")
    server, url = start_server(spec, tmp / "ledger.sqlite", args)
    try:
        local = [timed_embed(index, tmp / "local-0", local_cfg)]
        remote_cfg = EmbedConfig(teacher=url, token=TOKEN, batch_size=args.batch_size, in_flight=args.in_flight)
        remote = timed_embed(index, tmp / "remote", remote_cfg)
        local.append(timed_embed(index, tmp / "local-1", local_cfg))
    finally:
        server.terminate()
        server.wait(30)
    local_rate = sum(run["images_per_s"] for run in local) / len(local)
    a, b = load_targets(tmp / "remote", index), load_targets(tmp / "local-0", index)
    ratio = remote["images_per_s"] / local_rate
    return {
        "model": args.model,
        "images": args.images,
        "image_px": args.px,
        "batch_size": args.batch_size,
        "in_flight": args.in_flight,
        "workers": args.workers,
        "local_images_per_s": local_rate,
        "local_runs": local,
        "remote": remote,
        "ratio_remote_over_local": ratio,
        "ratio_end_to_end": remote["end_to_end_images_per_s"] / (sum(r["end_to_end_images_per_s"] for r in local) / len(local)),
        "max_abs_diff_embeddings": float((a.image - b.image).abs().max()),  # fp16 storage: same network, same pixels
        "same_identity": a.manifest["provenance"]["identity"] == b.manifest["provenance"]["identity"],
        "server_ledger": read_ledger(tmp / "ledger.sqlite")[account_id(TOKEN)],
        "target_met": ratio >= 0.8,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="test images")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass and per request")
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight (the client's --in-flight)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (seeded random weights)")
    p.add_argument("--px", type=int, default=256, help="side of the JPEGs")
    p.add_argument("--workers", type=int, default=EmbedConfig.workers, help="decoding workers (local) / threads (server)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    return p.parse_args(argv)


def report(result: dict) -> None:
    r = result["bench"]
    print(f"{r['model']} {r['images']} images, batch {r['batch_size']}, {r['in_flight']} in flight: "
          f"local {r['local_images_per_s']:.3f} img/s, remote {r['remote']['images_per_s']:.3f} img/s -> "
          f"ratio {r['ratio_remote_over_local']:.3f} (end to end {r['ratio_end_to_end']:.3f}; target >= 0.8: "
          f"{'met' if r['target_met'] else 'NOT met'}); max |diff| {r['max_abs_diff_embeddings']:.1e}, same identity "
          f"{r['same_identity']}; server charged {r['server_ledger']['images']} images + {r['server_ledger']['texts']} prompts, "
          f"{r['remote']['cost']['bytes_sent']:,} bytes sent")
    print(f"load average {result['environment']['loadavg_start']} -> {result['loadavg_end']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    result = {"settings": settings(args), "environment": environment("open_clip")}
    with tempfile.TemporaryDirectory(prefix="vl2v-bench-remote-") as tmp:
        result["bench"] = bench(args, Path(tmp))
    result["loadavg_end"] = os.getloadavg()
    report(result)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
