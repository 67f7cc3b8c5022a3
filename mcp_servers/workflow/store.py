"""The durable run record: one SQLite file (WAL, synchronous FULL) per workflow server.

Every state change of a run or a step is committed before the next action, so after a crash the
file tells what ran: a step ``done`` has its output (what its compensation needs), a step left
``running`` had an unknown outcome. One process owns the file (an exclusive ``flock`` on
``<file>.lock``): two servers resuming the same runs would undo them twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# Run states.
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
# Step states.
STEP_RUNNING = "running"
STEP_DONE = "done"
STEP_FAILED = "failed"
STEP_COMPENSATED = "compensated"
STEP_COMPENSATION_FAILED = "compensation_failed"
STEP_UNKNOWN = "unknown"  # was running when the server stopped: outcome not known

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    principal TEXT NOT NULL,
    idempotency_key TEXT,
    inputs_digest TEXT NOT NULL,
    caller TEXT NOT NULL,
    inputs TEXT NOT NULL,
    status TEXT NOT NULL,
    answer TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (workflow, principal, idempotency_key)
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step_id TEXT NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (run_id, step_id)
);
"""


class StoreLocked(RuntimeError):
    """Another process owns the run record."""


def inputs_digest(inputs: Any) -> str:
    return hashlib.sha256(orjson.dumps(inputs, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    workflow: str
    principal: str
    idempotency_key: str | None
    inputs_digest: str
    caller: dict[str, Any]
    inputs: dict[str, Any]
    status: str
    answer: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class StepRecord:
    step_id: str
    status: str
    output: Any
    error: str | None
    attempts: int


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class RunStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"{self.path} is used by another workflow server (one process per "
                              "run record)") from None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    def _run(self, row: tuple[Any, ...]) -> RunRecord:
        return RunRecord(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]),
                         orjson.loads(row[6]), row[7], _loads(row[8]))

    _RUN_COLUMNS = "id, workflow, principal, idempotency_key, inputs_digest, caller, inputs, status, answer"

    def create(self, workflow: str, principal: str, key: str | None, caller: dict[str, Any],
               inputs: dict[str, Any]) -> tuple[RunRecord, bool]:
        """A new run, or (same workflow, principal and key) the existing one: (record, created)."""
        now = time.time()
        run_id = uuid.uuid4().hex
        digest = inputs_digest(inputs)
        try:
            self._db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, workflow, principal, key, digest, orjson.dumps(caller).decode(),
                 orjson.dumps(inputs).decode(), RUNNING, None, now, now))
        except sqlite3.IntegrityError:
            existing = self.find(workflow, principal, key)
            if existing is None:
                raise
            return existing, False
        run = self.get(run_id)
        assert run is not None
        return run, True

    def find(self, workflow: str, principal: str, key: str | None) -> RunRecord | None:
        row = self._db.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE workflow=? AND principal=? "  # noqa: S608
            "AND idempotency_key=?", (workflow, principal, key)).fetchone()
        return None if row is None else self._run(row)

    def get(self, run_id: str) -> RunRecord | None:
        row = self._db.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id=?",  # noqa: S608
                               (run_id,)).fetchone()
        return None if row is None else self._run(row)

    def unfinished(self) -> list[RunRecord]:
        rows = self._db.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE status=? "  # noqa: S608
                                "ORDER BY created", (RUNNING,)).fetchall()
        return [self._run(r) for r in rows]

    def finish(self, run_id: str, status: str, answer: dict[str, Any]) -> None:
        self._db.execute("UPDATE runs SET status=?, answer=?, updated=? WHERE id=?",
                         (status, orjson.dumps(answer).decode(), time.time(), run_id))

    def prune(self, before: float) -> int:
        """Forget finished runs last changed before ``before`` (epoch seconds): their record, their
        steps and their idempotency keys. Runs in progress are kept."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM steps WHERE run_id IN (SELECT id FROM runs WHERE "
                             "status != ? AND updated < ?)", (RUNNING, before))
            removed = self._db.execute("DELETE FROM runs WHERE status != ? AND updated < ?",
                                       (RUNNING, before)).rowcount
        return int(removed)

    def steps(self, run_id: str) -> dict[str, StepRecord]:
        rows = self._db.execute("SELECT step_id, status, output, error, attempts FROM steps "
                                "WHERE run_id=?", (run_id,)).fetchall()
        return {r[0]: StepRecord(r[0], r[1], _loads(r[2]), r[3], r[4]) for r in rows}

    def set_step(self, run_id: str, step_id: str, status: str, *, output: Any = None,
                 error: str | None = None, attempt: bool = False) -> None:
        out = None if output is None else orjson.dumps(output).decode()
        self._db.execute(
            "INSERT INTO steps (run_id, step_id, status, output, error, attempts, updated) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT (run_id, step_id) DO UPDATE SET "
            "status=excluded.status, output=COALESCE(excluded.output, steps.output), "
            "error=excluded.error, attempts=steps.attempts + ?, updated=excluded.updated",
            (run_id, step_id, status, out, error, int(attempt), time.time(), int(attempt)))
