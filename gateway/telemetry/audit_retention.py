"""Retention of the audit trail, legal holds, and the chain's anchor.

Retention removes a chain's oldest rotated files whose newest entry is older than
``audit.retention_days``, oldest first and never the current file, so what remains is still one
unbroken chain. Before a file goes, ``<audit file>.anchor`` is replaced (atomically) by a record
of the last entry removed, ``{"file": "<name>:anchor", "seq", "hash", "ts", "kid", "sig"}``,
signed like a checkpoint: ``audit verify`` then requires the oldest remaining entry to follow
exactly that entry, so removing more than retention (or size rotation) did is caught.

Legal holds (``legal-holds.json`` beside the trail, replaced atomically) exempt entries from
pruning and erasure until released: a case hold stops all pruning of the trail, a subject hold
keeps every file holding an entry of that subject (and everything newer).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway.telemetry.audit_chain import CheckpointSigner, audit_files, checkpoint_line, last_line

ANCHOR_SUFFIX = ".anchor"
HOLDS_FILE = "legal-holds.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- legal holds ----------------------------------------------------------------------------------


def load_holds(directory: str | Path) -> dict[str, dict[str, Any]]:
    """{"sub": {subject: {"sid", "reason", "at"}}, "case": {case id: {"reason", "at"}}}."""
    try:
        data = orjson.loads((Path(directory) / HOLDS_FILE).read_bytes())
    except FileNotFoundError:
        return {"sub": {}, "case": {}}
    return {"sub": dict(data.get("sub", {})), "case": dict(data.get("case", {}))}


def set_hold(directory: str | Path, kind: str, value: str, *, sid: str | None = None,
             reason: str | None = None, held: bool = True) -> bool:
    """Add (``held``) or remove a hold; returns whether anything changed."""
    holds = load_holds(directory)
    if held:
        holds[kind][value] = {"sid": sid, "reason": reason,
                              "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")}
        changed = True
    else:
        changed = holds[kind].pop(value, None) is not None
    if changed:
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_atomic(Path(directory) / HOLDS_FILE, orjson.dumps(holds, option=orjson.OPT_INDENT_2))
    return changed


def _needles(holds: dict[str, dict[str, Any]]) -> list[bytes]:
    """Byte strings that mark an entry of a held subject, sealed (sid) or in clear (sub)."""
    out = []
    for sub, info in holds["sub"].items():
        out.append(b'"sub":' + orjson.dumps(sub))
        if info.get("sid"):
            out.append(b'"sid":"%s"' % str(info["sid"]).encode())
    return out


def file_is_held(path: Path, needles: list[bytes]) -> bool:
    """Whether ``path`` holds any needle: chunked C-speed search (a writer's commits wait on it)."""
    if not needles:
        return False
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            data = tail + chunk
            if any(n in data for n in needles):
                return True
            tail = data[-overlap:] if overlap else b""
    return False


# -- the anchor -----------------------------------------------------------------------------------


def anchor_path(base: Path) -> Path:
    return base.with_name(base.name + ANCHOR_SUFFIX)


def read_anchor(base: Path) -> dict[str, Any] | None:
    try:
        record = orjson.loads(anchor_path(base).read_bytes())
    except FileNotFoundError:
        return None
    return record if isinstance(record, dict) else None


def write_anchor(base: Path, last_line: bytes, signer: CheckpointSigner | None) -> None:
    """Record that the chain of ``base`` now legitimately starts after ``last_line`` (nothing to
    record for a line from before the chain, schema 1, or one that does not parse)."""
    try:
        entry = orjson.loads(last_line)
    except orjson.JSONDecodeError:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
        return
    seq = entry["seq"]
    digest = hashlib.sha256(last_line).hexdigest()
    _write_atomic(anchor_path(base), checkpoint_line(f"{base.name}:anchor", seq, digest, signer))


def _last_entry(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    line = last_line(path)
    if line is None:
        return None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return (line, entry) if isinstance(entry, dict) and "seq" in entry else None


def prune_chain(base: Path, retention_days: float, signer: CheckpointSigner | None, *,
                now: datetime | None = None, max_files: int | None = None) -> list[tuple[Path, int]]:
    """Remove the expired oldest rotated files of ``base``'s chain: [(file, its last seq)].

    The caller must be the chain's writer (or hold its lock): files are deleted, never renamed.
    ``max_files`` bounds one pass (a writer's commits wait while it prunes).
    """
    holds = load_holds(base.parent)
    if holds["case"]:
        return []
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=retention_days)).isoformat(
        timespec="microseconds").replace("+00:00", "Z")
    needles = _needles(holds)
    removed: list[tuple[Path, int]] = []
    for path in audit_files(base)[:-1]:  # never the current file
        if max_files is not None and len(removed) >= max_files:
            break
        last = _last_entry(path)
        if last is None or str(last[1].get("ts", "")) >= cutoff or file_is_held(path, needles):
            break
        write_anchor(base, last[0], signer)  # first: a crash now leaves an anchor ahead of the files
        path.unlink()
        removed.append((path, int(last[1]["seq"])))
    return removed


# -- service logs ---------------------------------------------------------------------------------


def rotate_logs(folder: Path) -> list[Path]:
    """Move each ``<name>.log`` aside as ``<name>.log.<UTC time of its last write>`` (at start,
    before any process writes it), so retention can remove whole earlier runs."""
    moved = []
    for log in sorted(folder.glob("*.log")):
        stamp = datetime.fromtimestamp(log.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%S")
        target = log.with_name(f"{log.name}.{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = log.with_name(f"{log.name}.{stamp}-{n}")
        log.rename(target)
        moved.append(target)
    return moved


def prune_logs(folder: Path, retention_days: float, *, now: datetime | None = None) -> list[Path]:
    """Remove rotated logs (``*.log.*``, never a live ``*.log``) last written before the window."""
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=retention_days)).timestamp()
    removed = []
    for log in sorted(folder.glob("*.log.*")):
        if log.is_file() and log.stat().st_mtime < cutoff:
            log.unlink()
            removed.append(log)
    return removed
