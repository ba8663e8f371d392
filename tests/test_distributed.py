"""torchrun: embedding parts and held-out domains shared out between processes, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vl2v import runs
from vl2v.cache import load_targets
from vl2v.data import scan_dataset


def torchrun(args: list[str], cwd, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vl2v", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_embed_and_align_under_torchrun(dataset, tiny_teacher, tmp_path):
    env = {"VL2V_CACHE": str(tmp_path / "cache")}
    done = torchrun(["embed", str(dataset), "--teacher", tiny_teacher, "--workers", "0"], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    cache_dir = next((tmp_path / "cache" / "toy").iterdir())
    parts = sorted(p.name for p in cache_dir.glob("images-*.h5"))
    assert parts == ["images-p1of2-00000.h5", "images-p2of2-00000.h5"]  # one part per process
    index = scan_dataset(dataset)
    targets = load_targets(cache_dir, index)  # complete, and every image embedded exactly once
    assert bool(targets.valid.all())
    assert json.loads((cache_dir / "manifest.json").read_text())["queries"]["images"] == len(index.files)

    flags = ["--student", "test_vit", "--no-pretrained", "--image-size", "32", "--steps", "3", "--checkpoint-freq", "2",
             "--batch-size", "2", "--workers", "0", "--teacher", tiny_teacher]
    done = torchrun(["align", str(dataset), *flags, "--run-dir", str(tmp_path / "dist")], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "vl2v", "align", str(dataset), *flags, "--run-dir", str(tmp_path / "one")],
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for env_i in range(3):  # three held-out domains over two processes: each trained once, as alone
        assert runs.read_final(runs.env_dir(tmp_path / "dist", env_i)) == runs.read_final(runs.env_dir(tmp_path / "one", env_i))
