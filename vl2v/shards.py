"""Teacher answers gathered into whole shards: the part of the embed job that image shards and view
shards share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vl2v.runtime import Progress, UserError

Answers = Callable[[list[list[str]]], Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]]
Write = Callable[[np.ndarray, dict[str, np.ndarray], np.ndarray], None]


@dataclass
class _OpenShard:
    """A shard whose batches are still being answered."""

    rows: np.ndarray
    arrays: dict[str, np.ndarray]  # per row: the embedding, and a view shard's parameters
    ok: np.ndarray
    answered: np.ndarray
    batches_left: int

    @classmethod
    def empty(cls, rows: np.ndarray, first: dict[str, np.ndarray], batch_size: int) -> _OpenShard:
        n = len(rows)
        arrays = {name: np.zeros((n, *a.shape[1:]), dtype=a.dtype) for name, a in first.items()}
        return cls(rows, arrays, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), -(-n // batch_size))


def embed_in_shards(paths: list[str], pending: list[int], batch_size: int, size: int, answers: Answers, write: Write, progress: Progress | None) -> int:
    """Embed dataset rows `pending` (`paths`: every dataset row's file) in shards of `size` rows made of whole batches:
    batches never straddle shards, so a resumed run sees exactly the batches an uninterrupted one
    would. `answers(paths of each batch)` yields (batch number, {name: [B, ...]}, [B] decoded) as
    answers arrive (a remote teacher's may complete out of order); `write(rows, arrays, decoded)`
    writes a shard, once all its batches are answered. After a fatal error the answered rows of
    unfinished shards are written too, so every row paid for is kept. Returns how many failed to
    decode."""
    shards = [np.array(pending[s : s + size]) for s in range(0, len(pending), size)]
    batches = [(i, s) for i, rows in enumerate(shards) for s in range(0, len(rows), batch_size)]
    batch_paths = [[paths[r] for r in shards[i][s : s + batch_size]] for i, s in batches]

    def flush(shard: _OpenShard, keep: np.ndarray) -> int:
        write(shard.rows[keep], {name: a[keep] for name, a in shard.arrays.items()}, shard.ok[keep])
        return int((~shard.ok[keep]).sum())

    open_shards: dict[int, _OpenShard] = {}
    done, n_failed = 0, 0
    try:
        for b, arrays, ok in answers(batch_paths):
            i, s = batches[b]
            if i not in open_shards:
                open_shards[i] = _OpenShard.empty(shards[i], arrays, batch_size)
            shard = open_shards[i]
            part = slice(s, s + len(ok))
            for name, a in arrays.items():
                shard.arrays[name][part] = a
            shard.ok[part], shard.answered[part] = ok, True
            shard.batches_left -= 1
            if shard.batches_left == 0:
                n_failed += flush(open_shards.pop(i), np.ones(len(shard.rows), dtype=bool))
            done += len(ok)
            if progress:
                progress(done, len(pending))
    except UserError:
        for shard in open_shards.values():
            if shard.answered.any():
                flush(shard, shard.answered)
        raise
    return n_failed
