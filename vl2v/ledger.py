"""The teacher server's ledger: queries charged per account and the record of every answer.

One SQLite file. A charge and the answers it paid for commit in one transaction, so a server killed
at any moment has either charged and recorded an item or done neither, and a restart forgets
nothing. An item is recorded once per account (its key is the primary key): answering it again
reads the record and charges nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np

from vl2v.runtime import UserError
from vl2v.teacher import describe_identity

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (account TEXT PRIMARY KEY, images INTEGER NOT NULL DEFAULT 0, texts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS answers (
    account TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, embedding BLOB NOT NULL,
    PRIMARY KEY (account, key)
);
"""
KINDS = ("images", "texts")
CHUNK = 500  # keys per SELECT: below SQLite's limit on bound parameters


def account_id(token: str | None) -> str:
    """The ledger's name for a token: a hash prefix, so the file never holds a token."""
    return "open" if token is None else "token-" + hashlib.sha256(token.encode()).hexdigest()[:16]


class Ledger:
    """The ledger of one teacher; a file holding another teacher's answers is refused."""

    def __init__(self, path: Path, identity: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE name = 'identity'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))
        elif json.loads(row[0]) != identity:
            theirs, ours = describe_identity(json.loads(row[0])), describe_identity(identity)
            raise UserError(f"Ledger {self.path} records the answers of teacher {theirs}, not {ours}: pass another --ledger.")

    def usage(self, account: str) -> dict[str, int]:
        with self.lock:
            row = self.db.execute("SELECT images, texts FROM usage WHERE account = ?", (account,)).fetchone()
        return dict(zip(KINDS, row or (0, 0)))

    def recorded(self, account: str, keys: list[str]) -> dict[str, np.ndarray]:
        """{key: [D] float32} for the keys this account was already answered."""
        unique = list(dict.fromkeys(keys))
        out = {}
        with self.lock:
            for i in range(0, len(unique), CHUNK):
                part = unique[i : i + CHUNK]
                marks = ",".join("?" * len(part))
                query = f"SELECT key, embedding FROM answers WHERE account = ? AND key IN ({marks})"
                out.update((k, np.frombuffer(e, dtype="<f4")) for k, e in self.db.execute(query, (account, *part)))
        return out

    def charge(self, account: str, kind: str, answers: dict[str, np.ndarray]) -> int:
        """Record `answers` and charge the account for those not recorded yet; returns that count."""
        if kind not in KINDS:
            raise ValueError(kind)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                before = self.db.total_changes
                self.db.executemany(
                    "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                    [(account, k, kind, np.ascontiguousarray(e, dtype="<f4").tobytes()) for k, e in answers.items()],
                )
                charged = self.db.total_changes - before
                self.db.execute("INSERT OR IGNORE INTO usage (account) VALUES (?)", (account,))
                self.db.execute(f"UPDATE usage SET {kind} = {kind} + ? WHERE account = ?", (charged, account))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return charged

    def close(self) -> None:
        self.db.close()


def read_ledger(path: Path) -> dict[str, dict[str, int]]:
    """Every account's charged queries and recorded answers: {account: {"images", "texts",
    "recorded_images", "recorded_texts"}}."""
    if not Path(path).is_file():
        raise UserError(f"No teacher ledger at {path}.")
    with contextlib.closing(sqlite3.connect(path)) as db:
        out = {a: {"images": i, "texts": t} for a, i, t in db.execute("SELECT account, images, texts FROM usage")}
        for account, kind, n in db.execute("SELECT account, kind, COUNT(*) FROM answers GROUP BY account, kind"):
            out.setdefault(account, {"images": 0, "texts": 0})[f"recorded_{kind}"] = n
    return out
