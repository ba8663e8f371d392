"""A teacher behind a server: `--teacher http(s)://HOST:PORT` (vl2v.serve, wire format vl2v.protocol).

Image files go out as stored, a batch per request, several requests in flight; augmented views
(`vl2v embed --views K`) are rendered here and go out as lossless PNGs. Every item carries
its content hash as idempotency key, so whatever the server already answered (a killed run's
requests in flight, a retry after a dropped connection) is answered again without being charged.
Connection errors, timeouts, 5xx and 429 with Retry-After are retried with exponential backoff and
jitter (Retry-After honoured); a wrong token, a spent quota or a malformed answer stop the run in
one line. Needs httpx (the `remote` extra).
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vl2v import protocol
from vl2v.data import load_rgb
from vl2v.runtime import UserError
from vl2v.teacher import describe_identity
from vl2v.views import N_PARAMS, ViewParams, render_view_image, stored_views

log = logging.getLogger(__name__)

TOKEN_ENV = "VL2V_TEACHER_TOKEN"
BACKOFF_SECONDS = 0.5  # the first retry waits 0.25-0.5 s, each next one twice as long
MAX_BACKOFF_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 300.0
KEPT = "Every row already paid is kept"


def _httpx():
    try:
        import httpx
    except ImportError:
        raise UserError("--teacher http(s)://... needs httpx: pip install 'vl2v[remote]'.") from None
    return httpx


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def backoff(attempt: int, after: float | None = None) -> float:
    """Seconds before retry number `attempt` (0-based): the server's Retry-After when it gave one,
    else exponential with jitter (half to all of BACKOFF × 2^attempt)."""
    if after is not None:
        return min(after, MAX_RETRY_AFTER_SECONDS)
    delay = min(BACKOFF_SECONDS * 2**attempt, MAX_BACKOFF_SECONDS)
    return random.uniform(delay / 2, delay)


class RemoteTeacher:
    """The `TeacherBackend` of a teacher server; connects and reads its info on creation."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, retries: int = 5, in_flight: int = 4):
        httpx = _httpx()
        self.url, self.retries, self.in_flight = url.rstrip("/"), retries, in_flight
        token = token or os.environ.get(TOKEN_ENV)
        self.has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=in_flight + 1, max_keepalive_connections=in_flight + 1)
        try:
            self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        except (httpx.InvalidURL, ValueError) as e:
            raise UserError(f"--teacher {url}: not a teacher server URL ({_first_line(e)}).") from None
        self.lock = threading.Lock()
        self.paid = {"image_queries": 0, "view_queries": 0, "text_queries": 0, "from_record": 0, "requests": 0, "retries": 0, "bytes_sent": 0}
        self.info = self._send("GET", protocol.INFO, first_contact=True)
        try:
            self._identity = {"model": str(self.info["identity"]["model"]), "weights": str(self.info["identity"]["weights"])}
            self.embed_dim, self.logit_scale = int(self.info["embed_dim"]), float(self.info["logit_scale"])
            self._image_size = tuple(int(x) for x in self.info["image_size"])
            self.preprocess = str(self.info["preprocess"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed(f"info: {_first_line(e)}") from None
        usage = self.info.get("usage") or {}
        log.info("teacher server %s: %s; this token has used %s queries (quota %s)", self.url, describe_identity(self._identity),
                 sum(v for k, v in usage.items() if k in ("images", "texts")), usage.get("quota") or "none")

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def identity(self) -> dict:
        return dict(self._identity)

    def provenance(self) -> dict:
        return {
            "teacher": self.url,
            "identity": self.identity(),
            "open_clip_version": self.info.get("open_clip_version"),
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "preprocess": self.preprocess,
            "random_init": bool(self.info.get("random_init")),
        }

    def cost(self) -> dict:
        with self.lock:
            return dict(self.paid)

    def _count(self, **amounts: int) -> None:
        with self.lock:
            for k, v in amounts.items():
                self.paid[k] += v

    # --- requests ----------------------------------------------------------------------------------

    def _malformed(self, what: str) -> UserError:
        return UserError(f"The teacher server at {self.url} sent a malformed answer ({what}). {KEPT}.")

    def _refused(self, response) -> UserError:
        detail = self._detail(response)
        if response.status_code == 401:
            fix = "pass the right --token or set $VL2V_TEACHER_TOKEN" if self.has_token else "it needs a token: pass --token or set $VL2V_TEACHER_TOKEN"
            return UserError(f"The teacher server at {self.url} refused the token (401 {detail}): {fix}.")
        if response.status_code == 429:
            return UserError(f"The teacher server at {self.url} refused more queries ({detail}). {KEPT}: get more quota, then re-run the same command.")
        return UserError(f"The teacher server at {self.url} refused a request ({response.status_code} {detail}).")

    @staticmethod
    def _detail(response) -> str:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        return str(detail if detail is not None else response.reason_phrase)[:200]

    def _send(self, method: str, path: str, body: bytes | None = None, first_contact: bool = False) -> dict:
        """One request, retried on connection errors, timeouts, 5xx and 429 with Retry-After."""
        httpx = _httpx()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        last, after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                self._count(retries=1)
                time.sleep(backoff(attempt - 1, after))
            after = None
            try:
                self._count(bytes_sent=len(body) if body else 0)
                response = self.client.request(method, path, content=body, headers=headers)
            except httpx.TransportError as e:  # refused, reset, dropped mid-answer, timed out
                if first_contact and isinstance(e, (httpx.ConnectError, httpx.UnsupportedProtocol)):
                    raise UserError(f"Cannot reach the teacher server at {self.url} ({_first_line(e)}). Is `vl2v serve-teacher` running there?") from None
                last = _first_line(e)
                continue
            if response.status_code == 200:
                try:
                    data = response.json()
                except ValueError as e:
                    raise self._malformed(f"not JSON: {_first_line(e)}") from None
                if not isinstance(data, dict):
                    raise self._malformed("not a JSON object")
                return data
            last = f"{response.status_code} {self._detail(response)}"
            after = retry_after(response.headers.get("retry-after"))
            if response.status_code == 429 and after is None:
                raise self._refused(response)  # a spent quota: waiting will not help
            if response.status_code not in (408, 429) and response.status_code < 500:
                raise self._refused(response)
        raise UserError(f"The teacher server at {self.url} failed {self.retries + 1} times in a row (last: {last}). {KEPT}: re-run the same command to resume.")

    def _embed(self, path: str, kind: str, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """[N, D] float32 and [N] decoded for the items of one request."""
        body = json.dumps({"items": items}).encode()
        self._count(requests=1)
        data = self._send("POST", path, body)
        try:
            shape = tuple(int(x) for x in data["shape"])
            if shape != (len(items), self.embed_dim):
                raise ValueError(f"shape {list(shape)} for {len(items)} items of width {self.embed_dim}")
            emb = protocol.decode_array(data["embeddings"], shape)
            ok = np.array([bool(x) for x in data["ok"]], dtype=bool)
            if len(ok) != len(items):
                raise ValueError(f"{len(ok)} decode flags for {len(items)} items")
            if not np.isfinite(emb).all() or not np.allclose(np.linalg.norm(emb[ok], axis=1), 1.0, atol=1e-3):
                raise ValueError("embeddings are not L2-normalised")
            charged, from_record, identity = int(data["charged"]), int(data["from_record"]), data["identity"]
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed(_first_line(e)) from None
        if identity != self._identity:
            raise UserError(f"The teacher behind {self.url} changed during the run ({describe_identity(self._identity)}, now {identity}). {KEPT}.")
        self._count(**{f"{kind}_queries": charged}, from_record=from_record)
        return emb, ok

    # --- the backend ---------------------------------------------------------------------------------

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> [N, D] L2-normalised float32."""
        out = []
        for i in range(0, len(texts), protocol.MAX_ITEMS):
            part = texts[i : i + protocol.MAX_ITEMS]
            items = [{"key": protocol.item_key("text", t.encode()), "text": t} for t in part]
            emb, ok = self._embed(protocol.TEXTS, "text", items)
            if not ok.all():
                raise self._malformed("a prompt came back without its embedding")
            out.append(torch.from_numpy(emb))
        return torch.cat(out)

    def payload(self, root: Path, path: str) -> bytes:
        """The bytes sent for one image: its file as stored (the server decodes it as a local run
        would)."""
        return (Path(root) / path).read_bytes()

    def view_payloads(self, root: Path, path: str, ks: range, seed: int) -> tuple[np.ndarray, list[bytes]]:
        """Views `ks` of one image, rendered here at the teacher's input size and encoded losslessly
        (PNG): the server's preprocessing then finds an image of its size and only normalises it, so
        it embeds exactly the view a local teacher renders. Also returns their [K', N_PARAMS] parameters."""
        image = load_rgb(Path(root) / path)
        params = stored_views(path, image.size, seed, ks)
        return params, [_png(render_view_image(image, ViewParams.from_array(p), self.image_size)) for p in params]

    def _embed_files(self, root: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        emb = np.zeros((len(paths), self.embed_dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        sent, items = [], []
        for i, path in enumerate(paths):
            try:
                data = self.payload(root, path)
            except OSError as e:  # gone since the scan: a row that did not decode, nothing paid
                log.warning("cannot read %s: %s", path, e)
                continue
            sent.append(i)
            items.append(_image_item(data))
        if items:
            emb[sent], ok[sent] = self._embed(protocol.IMAGES, "image", items)
        return emb, ok

    def _embed_view_files(self, root: Path, paths: list[str], ks: range, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, K', D], [B] decoded (every view answered), [B, K', N_PARAMS] for one request."""
        n = len(ks)
        emb = np.zeros((len(paths), n, self.embed_dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        params = np.zeros((len(paths), n, N_PARAMS), dtype=np.float32)
        sent, items = [], []
        for i, path in enumerate(paths):
            try:
                params[i], views = self.view_payloads(root, path, ks, seed)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # as a local run: a row that did not decode
                log.warning("cannot decode %s: %s", path, e)
                continue
            sent.append(i)
            items += [_image_item(data) for data in views]
        if items:
            got, good = self._embed(protocol.IMAGES, "view", items)
            emb[sent], ok[sent] = got.reshape(len(sent), n, -1), good.reshape(len(sent), n).all(axis=1)
        return emb, ok, params

    def encode_image_files(self, root: Path, batches: list[list[str]], workers: int = 0, precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """A request per batch, `in_flight` at a time, yielded as answers arrive. Decoding and
        precision are the server's (`workers`, `precision` do not apply)."""
        return self._in_flight(batches, lambda paths: self._embed_files(root, paths))

    def encode_view_files(self, root: Path, batches: list[list[str]], ks: range, seed: int, workers: int = 0,
                          precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """As `encode_image_files`: a request per batch holds every view of its images."""
        return self._in_flight(batches, lambda paths: self._embed_view_files(root, paths, ks, seed))

    def _in_flight(self, batches: list[list[str]], answer: Callable[[list[str]], tuple]) -> Iterator[tuple]:
        """(batch number, *answer(batch)) for every batch, `in_flight` requests at a time, as answers
        arrive. After a request fails for good, the others in flight are still collected (they are
        paid), then the error is raised."""
        todo = iter(enumerate(batches))
        error = None
        with ThreadPoolExecutor(self.in_flight, thread_name_prefix="teacher-request") as pool:
            running = {}

            def submit() -> None:
                batch = next(todo, None)
                if batch is not None:
                    running[pool.submit(answer, batch[1])] = batch[0]

            for _ in range(self.in_flight):
                submit()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    b = running.pop(fut)
                    try:
                        result = fut.result()
                    except UserError as e:
                        error = error or e
                        continue
                    yield (b, *result)
                    if error is None:
                        submit()
        if error is not None:
            raise error


def _image_item(data: bytes) -> dict:
    return {"key": protocol.item_key("image", data), "data": base64.b64encode(data).decode("ascii")}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless, and the same bytes for the same pixels: the same idempotency key
    return buf.getvalue()
