"""The teacher service's wire format, shared by the server (vl2v.serve) and the client (vl2v.remote).

    GET  /v1/info     -> {"identity", "embed_dim", "logit_scale", "image_size", "preprocess", ...,
                          "usage": {"images", "texts", "quota"}}   (the caller's account)
    POST /v1/images   {"items": [{"key", "data": base64 of the encoded image file}]}
    POST /v1/texts    {"items": [{"key", "text"}]}
                      -> {"identity", "embeddings": base64 of float32 [N, D], "shape": [N, D],
                          "ok": [N] decoded, "charged", "from_record", "usage"}

Every request carries `Authorization: Bearer TOKEN` when the server has tokens. Each item's `key`
is the sha256 of what it asks for (`item_key`): an item whose key was already answered for this
account is answered from the server's record and not charged again. A 429 with `Retry-After` is
"come back later"; a 429 without it means the account's quota is spent.
"""

from __future__ import annotations

import base64
import hashlib

import numpy as np

INFO, IMAGES, TEXTS = "/v1/info", "/v1/images", "/v1/texts"
MAX_ITEMS = 4096  # items per request


def item_key(kind: str, payload: bytes) -> str:
    """The idempotency key of one item: sha256 over its kind ("image" / "text") and its bytes."""
    return hashlib.sha256(kind.encode() + b"\n" + payload).hexdigest()


def encode_array(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode("ascii")


def decode_array(text: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 [N, D] from base64; ValueError when it does not have that shape."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4 * shape[0] * shape[1]:
        raise ValueError(f"{len(raw)} bytes for a {shape[0]} x {shape[1]} float32 array")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
