"""`vl2v serve-teacher`: a reference vendor service for any open_clip teacher (FastAPI + uvicorn).

Images arrive as the encoded files a client holds; the server decodes them with Pillow (as
`vl2v.data.load_rgb`: EXIF orientation, 8-bit RGB) and applies the teacher's own preprocessing, so
a remote embedding equals a local one. Concurrent requests share forward passes. Bearer tokens,
a per-token quota and the ledger (vl2v.ledger) make it a paid service that never charges twice.
The wire format is in vl2v.protocol.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, Field

from vl2v import __version__, protocol
from vl2v.data import load_rgb
from vl2v.ledger import Ledger, account_id
from vl2v.runtime import UserError, autocast_dtype, resolve_device
from vl2v.teacher import Teacher, create_teacher, describe_identity

log = logging.getLogger(__name__)

TOKEN_ENV = "VL2V_TEACHER_TOKEN"
KEY = r"^[0-9a-f]{64}$"


@dataclass(frozen=True)
class ServeConfig:
    teacher: str
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: tuple[str, ...] = field(default=(), repr=False)  # none: an open server
    quota: int | None = None  # queries (images + prompts) per token
    ledger: Path = Path("teacher-ledger.sqlite")
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 128  # most items per forward pass, across concurrent requests
    workers: int = min(4, os.cpu_count() or 1)  # image-decoding threads
    max_request_mb: int = 256

    def __post_init__(self):
        if self.quota is not None and self.quota < 0:
            raise UserError(f"--quota must be ≥ 0, not {self.quota}.")
        if self.batch_size < 1 or self.workers < 1:
            raise UserError("--batch-size and --workers must be ≥ 1.")

    def all_tokens(self) -> tuple[str, ...]:
        """`--token`s and $VL2V_TEACHER_TOKEN."""
        env = os.environ.get(TOKEN_ENV)
        return tuple(dict.fromkeys([*self.tokens, *([env] if env else [])]))


class ImageItem(BaseModel):
    key: str = Field(pattern=KEY)
    data: str  # base64 of the encoded image file


class TextItem(BaseModel):
    key: str = Field(pattern=KEY)
    text: str = Field(max_length=10_000)


class ImagesRequest(BaseModel):
    items: list[ImageItem] = Field(min_length=1, max_length=protocol.MAX_ITEMS)


class TextsRequest(BaseModel):
    items: list[TextItem] = Field(min_length=1, max_length=protocol.MAX_ITEMS)


class Batcher:
    """Runs `forward` over the items of concurrent requests together, at most `max_batch` per pass:
    whatever queued while the previous pass ran goes into the next one (no waiting on purpose)."""

    def __init__(self, forward: Callable[[list], np.ndarray], max_batch: int, executor: ThreadPoolExecutor):
        self.forward, self.max_batch, self.executor = forward, max_batch, executor
        self.queue: asyncio.Queue = asyncio.Queue()

    async def __call__(self, items: list) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):
            self.queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                rows = await loop.run_in_executor(self.executor, self.forward, [item for item, _ in batch])
            except Exception as e:  # every waiting request gets the failure (a 500), the loop goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), row in zip(batch, rows):
                if not fut.done():
                    fut.set_result(row)


class TeacherService:
    """Answers items for an account: from the record when answered before, else by the teacher
    within the account's quota, charging each new item once."""

    def __init__(self, teacher: Teacher, ledger: Ledger, cfg: ServeConfig):
        self.teacher, self.ledger, self.quota = teacher, ledger, cfg.quota
        self.amp = autocast_dtype(cfg.precision, teacher.device)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="teacher")  # one forward at a time
        self.decoders = ThreadPoolExecutor(cfg.workers, thread_name_prefix="decode")
        self.batchers = {"images": Batcher(self._images, cfg.batch_size, self.model_thread), "texts": Batcher(self._texts, cfg.batch_size, self.model_thread)}
        self.reserved: dict[str, int] = {}  # quota held by requests being computed

    def _images(self, tensors: list[torch.Tensor]) -> np.ndarray:
        with torch.autocast(self.teacher.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.teacher.encode_images(torch.stack(tensors)).cpu().numpy()

    def _texts(self, texts: list[str]) -> np.ndarray:
        return self.teacher.encode_texts(texts).cpu().numpy()

    def _decode(self, payload: bytes) -> torch.Tensor | None:
        try:
            return self.teacher.preprocess(load_rgb(io.BytesIO(payload)))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None

    def usage(self, account: str) -> dict:
        return {**self.ledger.usage(account), "quota": self.quota}

    def _reserve(self, account: str, n: int) -> None:
        used = sum(self.ledger.usage(account).values()) + self.reserved.get(account, 0)
        if self.quota is not None and n and used + n > self.quota:
            raise HTTPException(429, f"quota spent: {used} of {self.quota} queries used, this request needs {n} more")
        self.reserved[account] = self.reserved.get(account, 0) + n

    async def answer(self, account: str, kind: str, keys: list[str], payloads: list) -> dict:
        """Answers for every item in order; only items never answered for this account are computed."""
        recorded = self.ledger.recorded(account, keys)
        new = {k: p for k, p in zip(keys, payloads) if k not in recorded}
        self._reserve(account, len(new))  # no await since the usage was read: no other request interleaves
        try:
            fresh = await self._compute(kind, list(new.values()))
            charged = self.ledger.charge(account, kind, {k: e for k, e in zip(new, fresh) if e is not None})
        finally:
            self.reserved[account] -= len(new)
        answers = self.ledger.recorded(account, keys)
        emb = np.zeros((len(keys), self.teacher.embed_dim), dtype=np.float32)
        ok = [k in answers for k in keys]
        for i, k in enumerate(keys):
            if ok[i]:
                emb[i] = answers[k]
        return {
            "identity": self.teacher.identity(),
            "embeddings": protocol.encode_array(emb),
            "shape": list(emb.shape),
            "ok": ok,
            "charged": charged,
            "from_record": sum(k in recorded for k in keys),
            "usage": self.usage(account),
        }

    async def _compute(self, kind: str, payloads: list) -> list[np.ndarray | None]:
        """Embeddings of new items (None for an image that does not decode: not charged)."""
        if kind == "texts":
            return await self.batchers["texts"](payloads) if payloads else []
        loop = asyncio.get_running_loop()
        tensors = await asyncio.gather(*(loop.run_in_executor(self.decoders, self._decode, p) for p in payloads))
        good = [t for t in tensors if t is not None]
        rows = iter(await self.batchers["images"](good) if good else [])
        return [None if t is None else next(rows) for t in tensors]

    def info(self) -> dict:
        t = self.teacher
        return {
            "identity": t.identity(),
            "embed_dim": t.embed_dim,
            "logit_scale": t.logit_scale,
            "image_size": list(t.image_size),
            "preprocess": str(t.preprocess),
            "open_clip_version": open_clip.__version__,
            "random_init": t.random_init,
            "vl2v_version": __version__,
            "max_items": protocol.MAX_ITEMS,
        }


def _payloads(kind: str, items: list) -> tuple[list[str], list]:
    """Keys and payloads of a request's items; 400 when an item is not what its key says."""
    keys, payloads = [], []
    for i, item in enumerate(items):
        if kind == "images":
            try:
                payload = base64.b64decode(item.data, validate=True)
            except binascii.Error:
                raise HTTPException(400, f"item {i}: data is not base64") from None
            raw = payload
        else:
            payload, raw = item.text, item.text.encode()
        if protocol.item_key(kind.removesuffix("s"), raw) != item.key:
            raise HTTPException(400, f"item {i}: key is not the sha256 of its content (vl2v.protocol.item_key)")
        keys.append(item.key)
        payloads.append(payload)
    return keys, payloads


def create_app(service: TeacherService, tokens: tuple[str, ...], max_request_mb: int = 256) -> FastAPI:
    """The ASGI app: /v1/info, /v1/images, /v1/texts behind bearer tokens (none: open)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(b.run()) for b in service.batchers.values()]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="vl2v teacher", version=__version__, lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)

    def account(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if not tokens:
            return account_id(None)
        if credentials is None:
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        for token in tokens:
            if hmac.compare_digest(credentials.credentials.encode(), token.encode()):
                return account_id(token)
        raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def limit_size(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > max_request_mb << 20:
            return JSONResponse({"detail": f"request larger than {max_request_mb} MB"}, status_code=413)
        return await call_next(request)

    @app.get(protocol.INFO)
    def info(who: str = Depends(account)) -> JSONResponse:
        return JSONResponse({**service.info(), "usage": service.usage(who)})

    @app.post(protocol.IMAGES)
    async def images(body: ImagesRequest, who: str = Depends(account)) -> JSONResponse:
        return JSONResponse(await service.answer(who, "images", *_payloads("images", body.items)))

    @app.post(protocol.TEXTS)
    async def texts(body: TextsRequest, who: str = Depends(account)) -> JSONResponse:
        return JSONResponse(await service.answer(who, "texts", *_payloads("texts", body.items)))

    return app


def serve_teacher(cfg: ServeConfig) -> None:
    """Build the teacher (GPU when present) and its ledger, then serve until interrupted."""
    teacher = create_teacher(cfg.teacher, resolve_device(cfg.device))
    ledger = Ledger(cfg.ledger, teacher.identity())
    tokens = cfg.all_tokens()
    if not tokens:
        log.warning("no --token and no $%s: anyone who reaches %s:%d is served and charged to one open account", TOKEN_ENV, cfg.host, cfg.port)
    app = create_app(TeacherService(teacher, ledger, cfg), tokens, cfg.max_request_mb)
    log.info("serving %s on %s at http://%s:%d (ledger %s)", describe_identity(teacher.identity()), teacher.device, cfg.host, cfg.port, cfg.ledger)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        ledger.close()
