"""The embed job: kill -9 and resume, --shard I/N, decoding workers, and the `vl2v embed` command."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dataset
from vl2v.cache import list_shards, load_targets
from vl2v.cli import app
from vl2v.data import scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset, estimate_line
from vl2v.evaluate import teacher_zero_shot
from vl2v.runtime import UserError
from vl2v.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, SHARD, BATCH = 200, 16, 8


def config(teacher: str, **kw) -> EmbedConfig:
    return EmbedConfig(teacher=teacher, **{"workers": 0, "device": "cpu", "batch_size": BATCH, **kw})


def h5_content(path: Path) -> dict:
    """Every dataset (as raw bytes, with dtype and shape) and attribute of an HDF5 file."""
    with h5py.File(path, "r") as f:
        data = {k: (f[k].dtype.str, f[k].shape, f[k][()].tobytes() if f[k].dtype.kind != "O" else list(f[k][()])) for k in f}
        return {"datasets": data, "attrs": {k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k] for k in f.attrs}}


def cache_content(cache_dir: Path) -> dict:
    return {
        "files": sorted(p.name for p in cache_dir.iterdir()),
        "shards": {p.name: h5_content(p) for p in list_shards(cache_dir)},
        "text": h5_content(cache_dir / "text.h5"),
        "manifest": json.loads((cache_dir / "manifest.json").read_text()),
    }


# --- kill -9 and resume ---------------------------------------------------------------------------

def slow_embed_child(batch: int, shard: int, views: int = 0) -> str:
    """A script that embeds ROOT into CACHE_DIR, each teacher batch slowed down and written to LEDGER
    as it is sent (paid): a process for the tests to kill -9 mid-shard."""
    return textwrap.dedent(
        f"""
        import os, sys, time
        import torch
        torch.set_num_threads(1)  # as conftest: the same arithmetic as the test process
        from vl2v.data import scan_dataset
        from vl2v.embed import EmbedConfig, embed_dataset
        from vl2v.teacher import Teacher

        root, cache_dir, teacher, ledger = sys.argv[1:5]
        fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        encode = Teacher.encode_images

        def slow_encode(self, images):
            os.write(fd, b"%d\\n" % len(images))  # the query is paid when it is sent
            time.sleep(0.1)
            return encode(self, images)

        Teacher.encode_images = slow_encode
        cfg = EmbedConfig(teacher=teacher, workers=0, device="cpu", batch_size={batch}, shard_size={shard}, views={views})
        embed_dataset(scan_dataset(root), cache_dir, cfg)
        """
    )


def paid(ledger: Path) -> int:
    """Images the child sent to the teacher, from its ledger."""
    return sum(int(n) for n in ledger.read_text().split()) if ledger.exists() else 0


@pytest.fixture
def count_queries(monkeypatch) -> list[int]:
    """Images sent to the teacher in this process, batch by batch."""
    sent: list[int] = []
    encode = Teacher.encode_images

    def counting(self, images):
        sent.append(len(images))
        return encode(self, images)

    monkeypatch.setattr(Teacher, "encode_images", counting)
    return sent


def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_teacher, count_queries):
    root = make_dataset(tmp_path / "big", domains=("d0", "d1"), classes=("c0", "c1", "c2", "c3"), per_class=25)
    index = scan_dataset(root)
    assert len(index.files) == N_IMAGES
    killed, ledger = tmp_path / "killed", tmp_path / "ledger.txt"
    script = tmp_path / "child.py"
    script.write_text(slow_embed_child(BATCH, SHARD))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(root), str(killed), tiny_teacher, str(ledger)], env=env)
    try:
        deadline = time.monotonic() + 120
        # kill it mid-shard: a shard is whole on disk and a batch of the next one is with the teacher
        while not (killed.is_dir() and list_shards(killed) and paid(ledger) > SHARD * len(list_shards(killed))):
            assert child.poll() is None, "the embed child exited before it could be killed"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # what the killed run left: whole shards, an incomplete manifest, and the bill for them
    whole = len(list_shards(killed))
    assert 1 <= whole < N_IMAGES // SHARD
    paid_killed = paid(ledger)
    in_flight = paid_killed - whole * SHARD  # sent to the teacher, but its shard was never written
    assert 0 <= in_flight <= SHARD
    assert json.loads((killed / "manifest.json").read_text())["complete"] is False
    with pytest.raises(UserError, match=r"is incomplete \(an embed run was interrupted.*Finish it with: vl2v embed '"):
        load_targets(killed, index)

    # resume: only the images of missing shards are paid for
    report = embed_dataset(index, killed, config(tiny_teacher, shard_size=SHARD))
    assert report.complete and (report.embedded, report.reused) == (N_IMAGES - whole * SHARD, whole * SHARD)
    assert sum(count_queries) == N_IMAGES - whole * SHARD
    assert paid_killed + sum(count_queries) == N_IMAGES + in_flight <= N_IMAGES + SHARD
    assert report.queries_total == {"images": N_IMAGES, "texts": 4}  # the cache records what it holds

    # an uninterrupted run into another folder gives the same cache, byte for byte
    count_queries.clear()
    embed_dataset(index, tmp_path / "straight", config(tiny_teacher, shard_size=SHARD))
    assert sum(count_queries) == N_IMAGES
    resumed, straight = cache_content(killed), cache_content(tmp_path / "straight")
    # the killed run's holder note went with the resumed run: only the lock files stay
    locks = [".embed-all.lock", ".manifest.lock"]
    assert resumed["files"] == straight["files"] == locks + ["cost.json"] + [f"images-{k:05d}.h5" for k in range(13)] + ["manifest.json", "text.h5"]
    assert resumed["shards"].keys() == straight["shards"].keys()
    for name in straight["shards"]:
        assert resumed["shards"][name] == straight["shards"][name], name
    assert resumed["text"] == straight["text"]
    assert resumed["manifest"] == straight["manifest"]
    assert straight["manifest"]["shards"] == [f"images-{k:05d}.h5" for k in range(13)]
    a, b = load_targets(killed, index), load_targets(tmp_path / "straight", index)
    assert torch.equal(a.image, b.image) and torch.equal(a.valid, b.valid) and bool(a.valid.all())


# --- --shard I/N ----------------------------------------------------------------------------------


def test_shard_parts_merge_into_one_cache(dataset, tiny_teacher, tmp_path):
    index = scan_dataset(dataset)
    parts = tmp_path / "parts"
    for i in (1, 2, 3):
        report = embed_dataset(index, parts, config(tiny_teacher, shard=(i, 3)))
        assert report.embedded == 12 and report.complete is (i == 3)
        assert json.loads((parts / "manifest.json").read_text())["complete"] is (i == 3)
        if i < 3:
            with pytest.raises(UserError, match="is incomplete"):
                load_targets(parts, index)
    assert [p.name for p in list_shards(parts)] == ["images-p1of3-00000.h5", "images-p2of3-00000.h5", "images-p3of3-00000.h5"]
    for i, shard in enumerate(list_shards(parts)):  # part I holds the rows r with r % N == I - 1
        with h5py.File(shard, "r") as f:
            assert [p.decode() for p in f["path"][()]] == [index.files[r].path for r in range(i, 36, 3)]
    assert report.queries_total == {"images": 36, "texts": 3}

    single = tmp_path / "single"
    embed_dataset(index, single, config(tiny_teacher))
    merged, whole = load_targets(parts, index), load_targets(single, index)
    torch.testing.assert_close(merged.image, whole.image, atol=2e-3, rtol=0)  # other batches: fp16 rounding at most
    assert torch.equal(merged.valid, whole.valid) and bool(merged.valid.all())
    assert torch.equal(merged.text, whole.text) and merged.logit_scale == whole.logit_scale
    assert merged.manifest["provenance"] == whole.manifest["provenance"]
    assert merged.manifest["dataset"] == whole.manifest["dataset"]


def test_a_part_alone_is_incomplete(dataset, tiny_teacher, tmp_path):
    index = scan_dataset(dataset)
    out = tmp_path / "cache"
    report = embed_dataset(index, out, config(tiny_teacher, shard=(2, 3)))
    assert (report.embedded, report.text_queries, report.complete) == (12, 0, False)  # part 1 does the text
    assert not (out / "text.h5").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    with pytest.raises(UserError, match="is incomplete"):
        load_targets(out, index)


# --- workers ---------------------------------------------------------------------------------------


def test_two_decoding_workers_give_the_same_cache(dataset, tiny_teacher, tmp_path):
    index = scan_dataset(dataset)
    seen = []
    report = embed_dataset(index, tmp_path / "w2", config(tiny_teacher, workers=2, shard_size=16), progress=lambda d, n: seen.append((d, n)))
    embed_dataset(index, tmp_path / "w0", config(tiny_teacher, shard_size=16))
    assert report.embedded == 36 and report.complete
    assert seen[-1] == (36, 36) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert cache_content(tmp_path / "w2") == cache_content(tmp_path / "w0")
    assert len(list_shards(tmp_path / "w2")) == 3  # 16 + 16 + 4


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"shard": (0, 3)}, "--shard 0/3: I must be between 1 and N."),
        ({"store_dtype": "bf16"}, "--store-dtype must be fp16 or fp32, not 'bf16'."),
        ({"batch_size": 8, "shard_size": 4}, "--batch-size must be ≥ 1 and --shard-size ≥ --batch-size."),
    ],
)
def test_bad_config(kw, message):
    with pytest.raises(UserError) as e:
        EmbedConfig(**kw)
    assert str(e.value) == message


# --- the command ----------------------------------------------------------------------------------


def test_cli_embed_json(dataset, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    args = ["embed", str(dataset), "--teacher", tiny_teacher, "--workers", "0", "--batch-size", "8", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    out = tmp_path / "cache" / "toy" / "tiny-clip-tiny-clip"
    assert summary["cache_dir"] == str(out)
    assert (summary["embedded"], summary["reused"], summary["failed"], summary["text_queries"]) == (36, 0, 0, 3)
    assert summary["complete"] is True
    assert summary["queries_total"] == {"images": 36, "texts": 3}
    index = scan_dataset(dataset)
    expected = teacher_zero_shot(load_targets(out, index), index)
    assert summary["zero_shot"] == pytest.approx(expected) and list(expected) == ["art", "photo", "sketch"]
    assert all(0.0 <= v <= 1.0 for v in expected.values())

    again = json.loads(runner.invoke(app, args).stdout)
    assert (again["embedded"], again["reused"], again["text_queries"]) == (0, 36, 0)
    assert again["queries_total"] == {"images": 36, "texts": 3} and again["zero_shot"] == summary["zero_shot"]


@pytest.mark.parametrize(
    "shard, message",
    [("5/3", "error: --shard 5/3: I must be between 1 and N."), ("2of3", "error: --shard takes I/N, e.g. 1/4, not '2of3'.")],
)
def test_cli_bad_shard(dataset, tmp_path, monkeypatch, shard, message):
    monkeypatch.setenv("VL2V_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["embed", str(dataset), "--shard", shard, "--workers", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert result.stdout == ""
    assert not (tmp_path / "cache").exists()


# --- the CPU time estimate ------------------------------------------------------------------------


def test_estimate_line_figures():
    cpu = torch.device("cpu")
    assert estimate_line(24_788, 3.4, cpu) == (
        "embedding 24,788 images on cpu: about 2.0 h at 3.4 img/s (measured on the first batch); "
        "use a GPU (--device cuda) or split the work across machines with --shard I/N"
    )
    assert estimate_line(9_991, 3.4, cpu).startswith("embedding 9,991 images on cpu: about 49 min at 3.4 img/s")
    assert estimate_line(100, 2.0, cpu).startswith("embedding 100 images on cpu: about 50 s at 2.0 img/s")


def test_a_long_cpu_embed_logs_its_estimate_once_after_the_first_batch(dataset, tiny_teacher, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("vl2v.embed.LONG_CPU_EMBED_S", 0.0)  # the tiny teacher is fast: call any embed long
    seen = []
    with caplog.at_level(logging.INFO, logger="vl2v.embed"):
        embed_dataset(scan_dataset(dataset), tmp_path / "cache", config(tiny_teacher), progress=lambda d, n: seen.append(d))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedding ")]
    assert len(lines) == 1 and re.fullmatch(r"embedding 36 images on cpu: about \d+ s at [\d.]+ img/s \(measured on the first batch\); .*--shard I/N", lines[0])
    assert seen == [8, 16, 24, 32, 36]  # the caller's progress still sees every batch
