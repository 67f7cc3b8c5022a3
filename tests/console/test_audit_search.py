"""Reading the audit trail backwards in blocks: every complete line once, newest first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.console.audit_search import Filters, reverse_lines, search
from gateway.telemetry.audit import AuditEntry, AuditWriter
from gateway.telemetry.audit_keys import SubjectKeyStore


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_reverse_lines_yields_every_complete_line_newest_first(tmp_path: Path, block: int) -> None:
    """Lines of any length across block boundaries come back in reverse; a torn last line
    (no newline: a crash mid-write) is skipped."""
    lines = [b"x" * n for n in (1, 50, 3, 200, 9)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"torn')
    assert list(reverse_lines(path, block)) == lines[::-1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert list(reverse_lines(path, block)) == lines[::-1]


def test_reverse_lines_of_a_file_with_only_a_torn_line(tmp_path: Path) -> None:
    """A file holding only an unterminated line has no complete line."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"torn')
    assert list(reverse_lines(path, 4)) == []


async def test_opening_sealed_rows_unwraps_each_subject_key_once(tmp_path: Path) -> None:
    """A search over many sealed entries of one subject unwraps that subject's key once, and
    opens every row."""
    store = SubjectKeyStore(tmp_path, os.urandom(32))
    async with AuditWriter(tmp_path / "ext_authz-1.jsonl", keys=store) as writer:
        for n in range(300):
            await writer.write(AuditEntry(
                method="tools/call", server="files", target="read_file", sub="carol" if n % 2 else "dan",
                client_id=None, tenant="t1", decision="allow", reason=None, status="ok",
                latency_ms=1.0, request_id=f"r{n}", decision_id=f"d{n}"))
    asked: list[tuple[str, int]] = []
    original = store.key_for_reading

    def counting(sid: str, kid: int) -> Any:
        asked.append((sid, kid))
        return original(sid, kid)

    store.key_for_reading = counting  # type: ignore[method-assign]  # a spy on the real store
    result = search(tmp_path, Filters(), limit=500, max_scan=1000, store=store)
    assert len(result.rows) == 300 and result.sealed == 0
    assert {r["sub"] for r in result.rows} == {"carol", "dan"}
    assert sorted(asked) == sorted({(store.subject_id(s), 1) for s in ("carol", "dan")})
    store.close()


def test_search_reads_each_writers_folder_below_the_audit_dir(tmp_path: Path) -> None:
    """Chains in audit.dir and in its per-writer folders (compose and Kubernetes mount one volume
    per writer there) are searched together, newest first."""
    from tests.console.test_pages import _write_trail
    (tmp_path / "ext-authz-1").mkdir()
    (tmp_path / "files-1").mkdir()
    (tmp_path / "empty").mkdir()
    _write_trail(str(tmp_path / "ext-authz-1" / "ext_authz.jsonl"), 3, special=1)
    _write_trail(str(tmp_path / "files-1" / "files.jsonl"), 2, special=0)
    result = search(tmp_path, Filters(sub="bob"), limit=10, max_scan=100)
    assert [r["decision_id"] for r in result.rows] == ["d1", "d0"]


async def test_sealed_entries_open_with_the_key_store_of_their_own_folder(tmp_path: Path) -> None:
    """compose and Kubernetes writers each keep a key store beside their file: the console opens
    every writer's sealed entries with that folder's store (read-only, under its master key),
    not only with its own; a folder whose store was made under another master key stays sealed,
    and reading never writes to another writer's store."""
    import hashlib

    from gateway.telemetry.audit import AuditEntry, AuditWriter
    from gateway.telemetry.audit_keys import KEY_STORE_NAME, SubjectKeyStore

    master, other = bytes(range(32)), bytes(range(1, 33))

    async def write(folder: Path, key: bytes, sub: str, decision: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        store = SubjectKeyStore(folder, key)
        try:
            async with AuditWriter(folder / "w.jsonl", keys=store) as writer:
                await writer.write(AuditEntry(
                    method="tools/call", server="files", target="read_file", sub=sub, client_id="c",
                    tenant="acme", decision="allow", reason=None, status="ok", latency_ms=1.0,
                    request_id=f"r-{decision}", decision_id=decision, args_digest=None))
        finally:
            store.close()

    await write(tmp_path, master, "carol", "d-top")
    await write(tmp_path / "files-1", master, "alice", "d-files")
    await write(tmp_path / "erp-1", other, "bob", "d-erp")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (tmp_path / "files-1" / KEY_STORE_NAME, tmp_path / "erp-1" / KEY_STORE_NAME)}
    (tmp_path / "files-1").chmod(0o555)  # a read-only mount
    store = SubjectKeyStore(tmp_path, master)
    try:
        rows = {r["decision_id"]: r for r in search(tmp_path, Filters(), limit=10, max_scan=100,
                                                    store=store).rows}
        assert rows["d-top"]["sub"] == "carol" and rows["d-files"]["sub"] == "alice"
        assert rows["d-erp"]["sub"] is None  # another master key: stays sealed
        found = search(tmp_path, Filters(sub="alice"), limit=10, max_scan=100, store=store)
        assert [r["decision_id"] for r in found.rows] == ["d-files"]
    finally:
        store.close()
        (tmp_path / "files-1").chmod(0o755)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
