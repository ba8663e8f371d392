"""Concurrent `vl2v embed` runs on one cache, as real processes: per-part locks, the manifest lock."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vl2v import cache
from vl2v.cache import list_shards, load_targets
from vl2v.data import scan_dataset

REPO = Path(__file__).resolve().parents[1]

# Waits at a gate so that runs start together; pays 0.5 s per batch (ledger: images sent), so a
# part takes longer than the second part_lock waits before it says whom it waits for.
CHILD = textwrap.dedent(
    """
    import json, logging, os, sys, time
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from vl2v.data import scan_dataset
    from vl2v.embed import EmbedConfig, embed_dataset
    from vl2v.teacher import Teacher

    root, cache_dir, teacher, ledger, shard, gate = sys.argv[1:7]
    fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    encode = Teacher.encode_images

    def slow_encode(self, images):
        os.write(fd, b"%d\\n" % len(images))
        time.sleep(0.5)
        return encode(self, images)

    Teacher.encode_images = slow_encode
    index = scan_dataset(root)
    open(f"{gate}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.01)
    i, n = (int(x) for x in shard.split("/"))
    cfg = EmbedConfig(teacher=teacher, workers=0, device="cpu", batch_size=8, shard=(i, n))
    report = embed_dataset(index, cache_dir, cfg)
    print(json.dumps({"embedded": report.embedded, "complete": report.complete}))
    """
)


class Child:
    """One embed process; its stderr and ledger are files in `folder`."""

    def __init__(self, folder: Path, name: str, root: Path, cache_dir: Path, teacher: str, shard: str, gate: Path):
        script = folder / "child.py"
        script.write_text(CHILD)
        self.ledger, self.stderr_path = folder / f"{name}.ledger", folder / f"{name}.stderr"
        self.stderr_path.touch()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        args = [sys.executable, str(script), str(root), str(cache_dir), teacher, str(self.ledger), shard, str(gate)]
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err, text=True)

    @property
    def paid(self) -> int:
        return sum(int(n) for n in self.ledger.read_text().split()) if self.ledger.exists() else 0

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self) -> dict:
        out, _ = self.proc.communicate(timeout=240)
        assert self.proc.returncode == 0, self.stderr
        return json.loads(out)


@pytest.fixture
def children(tmp_path):
    started: list[Child] = []
    yield lambda *a: started.append(Child(tmp_path, f"child{len(started)}", *a)) or started[-1]
    for child in started:  # a failed test leaves no process behind
        child.proc.kill()
        child.proc.wait()


def wait_for(condition, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def start_together(gate: Path, *kids: Child) -> None:
    wait_for(lambda: len(list(gate.parent.glob(f"{gate.name}.ready.*"))) == len(kids), "children not ready")
    gate.touch()


def test_two_runs_of_one_part_pay_once_while_another_part_goes_on(dataset, tiny_teacher, tmp_path, children):
    """A double-submitted part 1/2 beside part 2/2: one complete cache, queries equal to images."""
    out, gate = tmp_path / "cache", tmp_path / "go"
    a, b, other = (children(dataset, out, tiny_teacher, shard, gate) for shard in ("1/2", "1/2", "2/2"))
    start_together(gate, a, b, other)
    reports = {child: child.finish() for child in (a, b, other)}

    assert a.paid + b.paid + other.paid == 36  # today's bug: 18 more for the second part 1/2
    assert {a.paid, b.paid} == {0, 18} and other.paid == 18
    first, second = (a, b) if a.paid else (b, a)
    assert f"Waiting for pid {first.proc.pid} on host {socket.gethostname()} (since " in second.stderr
    assert f"which is embedding part 1/2 of {out}; this run then embeds only what it left." in second.stderr
    assert "Waiting" not in first.stderr + other.stderr  # part 2/2 holds only its own lock
    assert (reports[first]["embedded"], reports[second]["embedded"], reports[other]["embedded"]) == (18, 0, 18)
    assert any(r["complete"] for r in reports.values())  # the last to finish completes the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["queries"] == {"images": 36, "texts": 3}
    assert [p.name for p in list_shards(out)] == ["images-p1of2-00000.h5", "images-p2of2-00000.h5"]
    assert load_targets(out, scan_dataset(dataset)).valid.all()
    assert sorted(p.name for p in out.glob(".*")) == [".embed-p1of2.lock", ".embed-p2of2.lock", ".manifest.lock"]


def test_a_waiting_run_names_the_holder_and_leaves_its_temporary_files(dataset, tiny_teacher, tmp_path, children):
    out, gate = tmp_path / "cache", tmp_path / "go"
    out.mkdir()
    gate.touch()
    with cache.part_lock(out, (1, 1)):  # this test process is the live holder of the part
        live = out / ".images-00000.h5.tmp"  # as if its first shard were being written
        live.write_bytes(b"half a shard")
        child = children(dataset, out, tiny_teacher, "1/1", gate)
        wait_for(lambda: "Waiting for" in child.stderr, "the second run did not say it waits")
        assert f"Waiting for pid {os.getpid()} on host {socket.gethostname()} (since " in child.stderr
        assert f"which is embedding {out};" in child.stderr
        assert live.read_bytes() == b"half a shard" and not list_shards(out) and child.paid == 0
    report = child.finish()  # the holder is gone: its temporary file is now stale and removed
    assert report == {"embedded": 36, "complete": True} and child.paid == 36
    assert not live.exists() and not (out / ".embed-all.holder.json").exists()


def test_a_run_of_the_whole_dataset_waits_for_live_parts(tmp_path, caplog):
    """In one process, with a thread: the lock files behave as between processes."""
    out = tmp_path / "cache"
    out.mkdir()
    acquired = threading.Event()

    def whole_dataset():
        with cache.part_lock(out, (1, 1)):
            acquired.set()

    with caplog.at_level(logging.INFO, logger="vl2v.cache"), cache.part_lock(out, (2, 4)):
        other = threading.Thread(target=whole_dataset)
        other.start()
        wait_for(lambda: "Waiting for" in caplog.text, "the whole-dataset run did not say it waits", 60)
        assert f"Waiting for pid {os.getpid()} on host {socket.gethostname()} (since " in caplog.text
        assert f"which is embedding part 2/4 of {out};" in caplog.text
        assert not acquired.is_set()
    other.join(60)
    assert acquired.is_set()
