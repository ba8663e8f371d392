"""The black-box teacher: a real `vl2v serve-teacher` process on 127.0.0.1, the client through
injected faults and kill -9, the server's ledger, quotas and budgets, identities."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import vl2v.remote
from conftest import make_dataset, make_image, write_tiny_teacher
from faultproxy import RETRY_AFTER, FaultProxy
from vl2v import protocol
from vl2v.cache import list_shards, load_targets, read_manifest
from vl2v.cli import app
from vl2v.data import load_rgb, scan_dataset
from vl2v.embed import EmbedConfig, embed_dataset
from vl2v.ledger import Ledger, account_id, read_ledger
from vl2v.remote import backoff, retry_after
from vl2v.runtime import UserError
from vl2v.serve import Batcher, ServeConfig, TeacherService, create_app
from vl2v.teacher import create_teacher

REPO = Path(__file__).resolve().parents[1]
QUOTA = 60  # per token, on the shared server
KEPT = "Every row already paid is kept"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vl2v serve-teacher` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, spec: str, ledger: Path, tokens: list[str], quota: int | None = None):
        self.spec, self.ledger, self.tokens, self.quota = spec, ledger, tokens, quota
        self.log = ledger.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = free_port()
        cmd = [sys.executable, "-m", "vl2v", "serve-teacher", self.spec, "--port", str(self.port), "--ledger", str(self.ledger), "--device", "cpu", "--workers", "1"]
        cmd += [a for t in self.tokens for a in ("--token", t)] + (["--quota", str(self.quota)] if self.quota is not None else [])
        env = {k: v for k, v in os.environ.items() if k != "VL2V_TEACHER_TOKEN"} | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, "the server did not start in time"
            try:
                if httpx.get(self.url + protocol.INFO, timeout=1).status_code == 401:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory) -> str:
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def server(teacher_spec, tmp_path_factory):
    """One server for the module; each test is its own client with its own token (ledger account)."""
    tokens = ["same", "faults", "garbage", "quota", "budget", "other", "kill", "views"]
    running = Server(teacher_spec, tmp_path_factory.mktemp("server") / "ledger.sqlite", tokens, QUOTA).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(vl2v.remote, "BACKOFF_SECONDS", 0.01)
    monkeypatch.delenv("VL2V_TEACHER_TOKEN", raising=False)


def config(teacher: str, **kw) -> EmbedConfig:
    return EmbedConfig(teacher=teacher, **{"workers": 0, "device": "cpu", "batch_size": 8, **kw})


def charged(ledger: Path, token: str) -> dict:
    return read_ledger(ledger).get(account_id(token), {})


def rows_in_cache(cache_dir: Path) -> int:
    total = 0
    for shard in list_shards(cache_dir):
        with h5py.File(shard, "r") as f:
            total += len(f["ok"])
    return total


# --- the same cache as a local teacher ------------------------------------------------------------


def test_a_url_builds_the_local_teachers_cache_and_pays_once(server, teacher_spec, tmp_path, monkeypatch):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    remote = embed_dataset(index, tmp_path / "remote", config(server.url, token="same"))
    local = embed_dataset(index, tmp_path / "local", config(teacher_spec))
    assert remote.complete and (remote.embedded, remote.text_queries) == (36, 3)
    assert remote.cost == {"image_queries": 36, "view_queries": 0, "text_queries": 3, "from_record": 0, "requests": 6, "retries": 0, "bytes_sent": remote.cost["bytes_sent"]}
    assert remote.cost["bytes_sent"] > sum((index.root / f.path).stat().st_size for f in index.files)  # the files, base64
    a, b = load_targets(tmp_path / "remote", index), load_targets(tmp_path / "local", index)
    torch.testing.assert_close(a.image, b.image, atol=1e-3, rtol=0)  # fp16 storage of the same network on the same pixels
    torch.testing.assert_close(a.text, b.text, atol=1e-6, rtol=0)
    assert a.logit_scale == pytest.approx(b.logit_scale) and torch.equal(a.valid, b.valid)
    prov_a, prov_b = a.manifest["provenance"], b.manifest["provenance"]
    assert prov_a.pop("teacher") == server.url and prov_b.pop("teacher") == teacher_spec
    assert prov_a == prov_b  # the same identity, preprocessing, width, scale
    assert a.manifest["cost"] == remote.cost
    assert charged(server.ledger, "same") == {"images": 36, "texts": 3, "recorded_images": 36, "recorded_texts": 3}

    # the same teacher whichever way it is reached: each cache is the other's, nothing is paid
    assert embed_dataset(index, tmp_path / "local", config(server.url, token="same")).embedded == 0
    assert embed_dataset(index, tmp_path / "remote", config(teacher_spec)).embedded == 0
    monkeypatch.setenv("VL2V_TEACHER_TOKEN", "same")
    assert load_targets(tmp_path / "local", index, teacher=server.url).valid.all()

    # a fresh folder through the URL again: every answer from the server's record, none charged
    again = embed_dataset(index, tmp_path / "again", config(server.url))
    assert again.cost["from_record"] == 39 and again.cost["image_queries"] == again.cost["text_queries"] == 0
    assert torch.equal(load_targets(tmp_path / "again", index).image, a.image)
    assert charged(server.ledger, "same")["images"] == 36


def test_views_go_out_rendered_and_match_the_local_teachers_paid_once(server, teacher_spec, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy", per_class=1))  # 9 images + 18 views + 3 prompts: within the quota
    remote = embed_dataset(index, tmp_path / "remote", config(server.url, token="views", views=2))
    embed_dataset(index, tmp_path / "local", config(teacher_spec, views=2))
    assert remote.complete and (remote.embedded, remote.views_embedded) == (9, 18)
    assert (remote.cost["image_queries"], remote.cost["view_queries"], remote.cost["text_queries"]) == (9, 18, 3)
    a, b = load_targets(tmp_path / "remote", index, views=True).views, load_targets(tmp_path / "local", index, views=True).views
    assert np.array_equal(a.params.array, b.params.array)  # drawn from (seed, path, k) on either side
    # the server decodes the PNG of the view rendered at its input size: the local teacher's input exactly
    np.testing.assert_allclose(a.embedding.astype(np.float32), b.embedding.astype(np.float32), atol=2e-3, rtol=0)
    assert charged(server.ledger, "views") == {"images": 27, "texts": 3, "recorded_images": 27, "recorded_texts": 3}
    assert read_manifest(tmp_path / "remote")["views"]["queries"] == 18

    again = embed_dataset(index, tmp_path / "again", config(server.url, token="views", views=2))  # the same PNGs: the same keys
    assert again.cost["from_record"] == 30 and again.cost["view_queries"] == again.cost["image_queries"] == 0
    assert charged(server.ledger, "views")["images"] == 27


def test_moved_weights_still_match_their_cache(teacher_spec, tmp_path, monkeypatch):
    index = scan_dataset(make_dataset(tmp_path / "toy", per_class=1))
    config_json, weights = teacher_spec.split(".json:")
    moved = tmp_path / "moved" / Path(weights).name
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    embed_dataset(index, tmp_path / "cache", config(teacher_spec))
    moved_spec = f"{config_json}.json:{moved}"
    again = embed_dataset(index, tmp_path / "cache", config(moved_spec))
    assert (again.embedded, again.reused, again.text_queries) == (0, 9, 0)
    assert load_targets(tmp_path / "cache", index, teacher=moved_spec).valid.all()


def test_a_server_of_another_teacher_is_refused(server, teacher_spec, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy", per_class=1))
    random_spec = teacher_spec.split(".json:")[0] + ".json:random"
    embed_dataset(index, tmp_path / "cache", config(random_spec))
    with pytest.raises(UserError) as e:
        embed_dataset(index, tmp_path / "cache", config(server.url, token="other"))
    assert str(e.value).startswith(
        f"{tmp_path / 'cache'} holds embeddings of teacher {random_spec} (tiny-clip (weights random)), "
        f"not of the teacher at {server.url} (tiny-clip (weights sha256:"
    )
    assert str(e.value).endswith("). Pass another --cache-dir, or delete that folder.")
    assert charged(server.ledger, "other") == {}


# --- one-line errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token", "nope"], "error: The teacher server at {url} refused the token (401 wrong token): pass the right --token or set $VL2V_TEACHER_TOKEN."),
        ([], "error: The teacher server at {url} refused the token (401 a bearer token is required): it needs a token: pass --token or set $VL2V_TEACHER_TOKEN."),
        (["--teacher", "http://127.0.0.1:{free}"], "error: Cannot reach the teacher server at http://127.0.0.1:{free} (ConnectError: [Errno 111] Connection refused). Is `vl2v serve-teacher` running there?"),
    ],
)
def test_wrong_token_and_unreachable_port(server, tmp_path, args, message):
    root = make_dataset(tmp_path / "toy", per_class=1)
    free = free_port()
    args = [a.format(free=free) for a in args]
    cmd = ["embed", str(root), "--teacher", server.url, "--cache-dir", str(tmp_path / "cache"), "--workers", "0", *args]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [message.format(url=server.url, free=free)]
    assert not (tmp_path / "cache").exists()  # nothing written


def test_missing_extras_name_the_extra(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "toy", per_class=1)
    monkeypatch.setitem(sys.modules, "httpx", None)
    result = CliRunner().invoke(app, ["embed", str(root), "--teacher", "http://127.0.0.1:9", "--workers", "0"])
    assert (result.exit_code, result.stderr.strip().splitlines()[-1]) == (2, "error: --teacher http(s)://... needs httpx: pip install 'vl2v[remote]'.")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "vl2v.serve")
    result = CliRunner().invoke(app, ["serve-teacher", "ViT-B-32:random"])
    assert (result.exit_code, result.stderr.strip()) == (2, "error: vl2v serve-teacher needs FastAPI and uvicorn: pip install 'vl2v[serve]'.")


# --- faults ---------------------------------------------------------------------------------------


def test_faults_are_retried_and_nothing_is_charged_twice(server, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    # the prompts' request meets 500, a dropped answer (charged), 429 + Retry-After, an answer held
    # past the timeout, then a slow answer; the first images' request a 500
    proxy = FaultProxy(server.port, ["500", "drop", "429", "hang", "slow", "500"])
    try:
        report = embed_dataset(index, tmp_path / "cache", config(proxy.url, token="faults", batch_size=4, in_flight=1, timeout=2.0))
    finally:
        proxy.close()
    assert report.complete and report.embedded == 36
    assert report.cost["retries"] == 5
    assert report.cost["from_record"] == 3  # the prompts charged with the dropped answer, answered again free
    assert report.cost["text_queries"] == 0 and report.cost["image_queries"] == 36
    assert charged(server.ledger, "faults") == {"images": 36, "texts": 3, "recorded_images": 36, "recorded_texts": 3}
    faults = [(t, fault) for t, line, fault in proxy.seen if line.startswith("POST")]
    assert [f for _, f in faults[:7]] == ["500", "drop", "429", "hang", "slow", "500", "pass"]
    assert faults[3][0] - faults[2][0] >= RETRY_AFTER  # Retry-After honoured
    assert load_targets(tmp_path / "cache", index).valid.all()


def test_a_malformed_answer_stops_the_run_and_keeps_what_was_paid(server, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    proxy = FaultProxy(server.port, ["pass", "pass", "pass", "garbage"])  # prompts, 2 batches, then garbage
    try:
        with pytest.raises(UserError) as e:
            embed_dataset(index, tmp_path / "cache", config(proxy.url, token="garbage", batch_size=4, in_flight=1))
    finally:
        proxy.close()
    assert str(e.value) == f"The teacher server at {proxy.url} sent a malformed answer (not JSON: JSONDecodeError: Expecting value: line 1 column 1 (char 0)). {KEPT}."
    assert rows_in_cache(tmp_path / "cache") == 8 and read_manifest(tmp_path / "cache")["complete"] is False
    resumed = embed_dataset(index, tmp_path / "cache", config(server.url, token="garbage", batch_size=4))
    assert resumed.complete and resumed.embedded == 28 and resumed.cost["from_record"] == 4
    assert charged(server.ledger, "garbage") == {"images": 36, "texts": 3, "recorded_images": 36, "recorded_texts": 3}


def test_the_quota_running_out_mid_run(server, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy", per_class=8))  # 72 images + 3 prompts > 60
    with pytest.raises(UserError) as e:
        embed_dataset(index, tmp_path / "cache", config(server.url, token="quota", batch_size=4, in_flight=1))
    assert str(e.value) == (
        f"The teacher server at {server.url} refused more queries (quota spent: 59 of {QUOTA} queries used, this request "
        f"needs 4 more). {KEPT}: get more quota, then re-run the same command."
    )
    assert charged(server.ledger, "quota") == {"images": 56, "texts": 3, "recorded_images": 56, "recorded_texts": 3}
    assert rows_in_cache(tmp_path / "cache") == 56  # every image paid for is in the cache


def test_the_budget_is_never_exceeded(server, tmp_path):
    index = scan_dataset(make_dataset(tmp_path / "toy"))
    with pytest.raises(UserError) as e:
        embed_dataset(index, tmp_path / "cache", config(server.url, token="budget", max_queries=20))
    assert str(e.value) == (
        "plan: 36 images + 3 prompts = 39 queries to pay (0 images cached; --max-queries 20), over the budget. "
        "Options: --max-queries 39 to pay for all of it; --budget subset to embed 17 of the 36 images, "
        "stratified by domain × class; or fewer prompt templates (--prompts)."
    )
    assert charged(server.ledger, "budget") == {}  # refused before paying anything
    report = embed_dataset(index, tmp_path / "cache", config(server.url, token="budget", max_queries=20, budget="subset"))
    assert report.complete and report.plan["images"] == 17 and report.plan["left_out"] == 19
    assert charged(server.ledger, "budget") == {"images": 17, "texts": 3, "recorded_images": 17, "recorded_texts": 3}
    assert load_targets(tmp_path / "cache", index).valid.sum() == 17 == report.images_with_targets


# --- kill -9 of the client, then of the server ----------------------------------------------------


def test_kill_9_then_resume_charges_every_image_and_prompt_once(server, teacher_spec, tmp_path):
    root = make_dataset(tmp_path / "toy", domains=("d0", "d1"), classes=("c0", "c1"), per_class=12)
    index = scan_dataset(root)
    proxy = FaultProxy(server.port, delay=0.3)  # answers linger on the way back: some are paid, not yet received
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "vl2v", "embed", str(root), "--teacher", proxy.url, "--token", "kill", "--cache-dir", str(cache),
           "--batch-size", "4", "--in-flight", "2", "--workers", "0"]
    child = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (cache.is_dir() and list_shards(cache) and charged(server.ledger, "kill").get("images", 0) > rows_in_cache(cache)):
            assert child.poll() is None, "the client exited before it could be killed"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        server.kill()  # and the server too: its ledger is on disk
    finally:
        child.kill()
        proxy.close()
    kept, paid = rows_in_cache(cache), charged(server.ledger, "kill")
    assert 4 <= kept < 48 and paid["images"] > kept and paid["texts"] == 2

    server.start()  # on a new port: a cache belongs to the teacher's identity, not to a URL
    report = embed_dataset(index, cache, config(server.url, token="kill", batch_size=4))
    assert report.complete and report.embedded == 48 - kept
    assert report.cost["image_queries"] + report.cost["from_record"] == 48 - kept
    assert report.cost["from_record"] >= paid["images"] - kept  # what was in flight came back free
    assert charged(server.ledger, "kill") == {"images": 48, "texts": 2, "recorded_images": 48, "recorded_texts": 2}
    embed_dataset(index, tmp_path / "local", config(teacher_spec))
    torch.testing.assert_close(load_targets(cache, index).image, load_targets(tmp_path / "local", index).image, atol=1e-3, rtol=0)


# --- the server in-process: protocol, ledger, batching ---------------------------------------------


def png_bytes(tmp_path: Path, seed: int) -> bytes:
    return make_image(tmp_path / f"{seed}.png", seed).read_bytes()


def item(data: bytes) -> dict:
    return {"key": protocol.item_key("image", data), "data": base64.b64encode(data).decode()}


def test_server_answers_from_its_record_within_the_quota(tiny_teacher, tmp_path):
    teacher = create_teacher(tiny_teacher, torch.device("cpu"))
    ledger = Ledger(tmp_path / "ledger.sqlite", teacher.identity())
    service = TeacherService(teacher, ledger, ServeConfig(tiny_teacher, quota=6, workers=1))
    auth = {"Authorization": "Bearer t"}
    with TestClient(create_app(service, ("t",))) as client:
        assert client.get(protocol.INFO).status_code == 401
        assert client.get(protocol.INFO, headers={"Authorization": "Bearer x"}).json() == {"detail": "wrong token"}
        info = client.get(protocol.INFO, headers=auth).json()
        assert info["identity"] == teacher.identity() and info["usage"] == {"images": 0, "texts": 0, "quota": 6}

        image = png_bytes(tmp_path, 1)
        answer = client.post(protocol.IMAGES, json={"items": [item(image), item(b"not an image")]}, headers=auth).json()
        assert (answer["ok"], answer["charged"], answer["from_record"]) == ([True, False], 1, 0)  # undecodable: not charged
        emb = protocol.decode_array(answer["embeddings"], tuple(answer["shape"]))
        expected = teacher.encode_images(teacher.preprocess(load_rgb(io.BytesIO(image)))[None])[0].numpy()
        np.testing.assert_allclose(emb[0], expected, atol=1e-6)
        again = client.post(protocol.IMAGES, json={"items": [item(image)]}, headers=auth).json()
        assert (again["charged"], again["from_record"], again["embeddings"]) == (0, 1, protocol.encode_array(emb[:1]))

        twice = client.post(protocol.IMAGES, json={"items": [item(png_bytes(tmp_path, 2))] * 2}, headers=auth).json()
        assert (twice["ok"], twice["charged"]) == ([True, True], 1)  # one content, one charge

        bad = {**item(image), "key": protocol.item_key("image", b"other")}
        response = client.post(protocol.IMAGES, json={"items": [bad]}, headers=auth)
        assert (response.status_code, response.json()["detail"]) == (400, "item 0: key is not the sha256 of its content (vl2v.protocol.item_key)")

        texts = [{"key": protocol.item_key("text", t.encode()), "text": t} for t in ("a", "b", "c", "d", "e")]
        assert client.post(protocol.TEXTS, json={"items": texts[:4]}, headers=auth).json()["usage"] == {"images": 2, "texts": 4, "quota": 6}
        spent = client.post(protocol.TEXTS, json={"items": texts[3:]}, headers=auth)
        assert spent.status_code == 429 and "retry-after" not in spent.headers
        assert spent.json()["detail"] == "quota spent: 6 of 6 queries used, this request needs 1 more"
        assert client.post(protocol.TEXTS, json={"items": texts[:1]}, headers=auth).json()["charged"] == 0  # paid before: still answered
    ledger.close()

    # a restart remembers everything; a ledger of another teacher is refused
    reopened = Ledger(tmp_path / "ledger.sqlite", teacher.identity())
    assert reopened.usage(account_id("t")) == {"images": 2, "texts": 4}
    reopened.close()
    with pytest.raises(UserError) as e:
        Ledger(tmp_path / "ledger.sqlite", {"model": "tiny-clip", "weights": "random"})
    assert str(e.value) == f"Ledger {tmp_path / 'ledger.sqlite'} records the answers of teacher tiny-clip (weights {teacher.weights[:19]}…), not tiny-clip (weights random): pass another --ledger."


def test_concurrent_requests_share_forward_passes():
    calls = []

    def forward(items):
        calls.append(list(items))
        return np.array(items) * 10

    async def main():
        batcher = Batcher(forward, max_batch=3, executor=ThreadPoolExecutor(1))
        task = asyncio.create_task(batcher.run())
        out = await asyncio.gather(batcher([1, 2]), batcher([3, 4]))
        task.cancel()
        return out

    assert asyncio.run(main()) == [[10, 20], [30, 40]]
    assert calls == [[1, 2, 3], [4]]


def test_backoff_and_retry_after():
    assert retry_after("2") == 2.0 and retry_after("0.3") == 0.3 and retry_after(None) is None and retry_after("soon") is None
    assert 9 < retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))) <= 10
    assert backoff(0, after=7.0) == 7.0 and backoff(0, after=1e6) == vl2v.remote.MAX_RETRY_AFTER_SECONDS
    for attempt in range(8):
        delay = min(vl2v.remote.BACKOFF_SECONDS * 2**attempt, vl2v.remote.MAX_BACKOFF_SECONDS)
        waits = [backoff(attempt) for _ in range(50)]
        assert all(delay / 2 <= w <= delay for w in waits) and len(set(waits)) > 1  # jittered
