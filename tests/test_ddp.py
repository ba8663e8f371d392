"""DDP under torchrun on the CPU (gloo): 2 processes equal 1 with the same global batch, a killed
rank resumes; fp16 trains with a gradient scaler that checkpoints save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from vl2v import runs
from vl2v.config import TrainConfig
from vl2v.data import all_splits, scan_dataset
from vl2v.methods import StepTargets, get_method
from vl2v.train import Context, make_trainer, train_step

ERM = ["--method", "erm", "--student", "test_resnet", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
       "--workers", "0", "--test-env", "art", "--lr", "0.001", "--json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in runs.read_records(runs.env_dir(run_dir, 0))]


def assert_close(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for x, y in zip(a, b):
        for k, v in x.items():
            assert v == pytest.approx(y[k], abs=tol) if isinstance(v, float) else v == y[k], (x["step"] if "step" in x else x, k)


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vl2v", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vl2v", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp") / "toy", per_class=6)


def test_two_ddp_processes_equal_one_with_the_same_global_batch(toy, tmp_path):
    args = [*ERM, "--steps", "20", "--checkpoint-freq", "5"]
    ddp = torchrun(["train", str(toy), *args, "--parallel", "ddp", "--run-dir", str(tmp_path / "ddp")], tmp_path)
    one = single(["train", str(toy), *args, "--run-dir", str(tmp_path / "one")], tmp_path)
    out, errors = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, errors[:3000]
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert [r["step"] for r in a if r["kind"] == "checkpoint"] == [0, 5, 10, 15, 19]
    assert_close(a, b)
    assert not list((tmp_path / "ddp").glob("env1")) and not list((tmp_path / "ddp").glob("env2"))


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, from /proc."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(pid)
    return found


def test_kill_9_of_one_rank_then_restart_resumes(toy, tmp_path):
    args = ["train", str(toy), *ERM, "--steps", "120", "--checkpoint-freq", "20", "--parallel", "ddp", "--run-dir", str(tmp_path / "killed")]
    victim = torchrun(args, tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and len([r for r in records(tmp_path / "killed") if r["kind"] == "checkpoint"]) < 2:
        time.sleep(0.05)
    written = len(records(tmp_path / "killed"))
    assert 2 <= written < 7, "the run ended before it could be killed"
    os.kill(_workers(victim.pid)[1], signal.SIGKILL)
    victim.communicate(timeout=300)
    assert victim.returncode != 0
    assert runs.read_final(runs.env_dir(tmp_path / "killed", 0)) is None  # not finished

    resumed = torchrun(args, tmp_path)
    _, errors = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, errors[-3000:]
    reference = torchrun([*args[:-1], str(tmp_path / "ref")], tmp_path)  # the same, never killed
    _, errors = reference.communicate(timeout=600)
    assert reference.returncode == 0, errors[-3000:]
    assert records(tmp_path / "killed") == records(tmp_path / "ref")


def test_fp16_trains_with_a_gradient_scaler_saved_in_checkpoints(toy, tmp_path):
    cfg = TrainConfig(method="erm", student="test_resnet", pretrained=False, image_size=32, batch_size=2, workers=0)
    index = scan_dataset(toy)
    labels = torch.tensor([f.label for f in index.files])
    ctx = Context(cfg, get_method("erm"), tmp_path, index, None, all_splits(index, 0), labels, torch.device("cpu"), torch.float16, None, None)
    t = make_trainer(ctx, 0)
    assert t.scaler.is_enabled() and t.scaler.get_scale() == 2.0**16
    images, y = torch.randn(4, 3, 32, 32), labels[:4]
    loss = train_step(ctx, t, 0, images, StepTargets(y, None, None, 1.0))
    assert loss == loss  # a number: the scaler unscaled the gradients or skipped an overflowing step
    assert t.scaler.get_scale() <= 2.0**16
    runs.save_state(tmp_path, t.model, t.optimizer, None, 1, [], None, t.scaler)
    fresh = make_trainer(ctx, 0)
    assert fresh.scaler.state_dict() != t.scaler.state_dict()
    runs.load_state(tmp_path, fresh.model, fresh.optimizer, None, fresh.scaler)
    assert fresh.scaler.state_dict() == t.scaler.state_dict()
    for amp in (None, torch.bfloat16):  # bf16 and fp32 need no loss scaling
        ctx.amp = amp
        assert not make_trainer(ctx, 0).scaler.is_enabled()
