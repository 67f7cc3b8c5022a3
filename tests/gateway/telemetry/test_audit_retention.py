"""Audit retention: expired rotated files removed oldest first, the anchor carried forward, holds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.telemetry.audit import AuditEntry, AuditWriter, audit_files, iter_audit, iter_audit_all
from gateway.telemetry.audit_chain import CheckpointSigner, generate_signing_key, load_public_key
from gateway.telemetry.audit_retention import (
    file_is_held,
    prune_logs,
    read_anchor,
    rotate_logs,
    set_hold,
)
from gateway.telemetry.audit_verify import verify_chain

OLD = "2020-01-01T00:00:00.000000Z"


def entry(n: int, ts: str | None = None, sub: str = "alice") -> AuditEntry:
    extra = {"ts": ts} if ts else {}
    return AuditEntry(method="tools/call", server="files", target="read_file", sub=sub, client_id="c",
                      tenant="t", decision="allow", reason=None, status="ok", latency_ms=1.0,
                      request_id=f"r{n}", decision_id=None, **extra)


@pytest.fixture
def signer(tmp_path: Path) -> CheckpointSigner:
    generate_signing_key(tmp_path / "k.pem")
    return CheckpointSigner.from_file(tmp_path / "k.pem")


async def write(path: Path, signer: CheckpointSigner, entries: list[AuditEntry], **kw: object) -> None:
    async with AuditWriter(path, max_bytes=1500, keep=100, signer=signer,
                           **kw) as writer:  # type: ignore[arg-type]
        for e in entries:
            await writer.write(e)


async def test_writer_removes_exactly_the_expired_files_and_verify_passes(
        tmp_path: Path, signer: CheckpointSigner) -> None:
    """Files whose newest entry is past retention go, newer ones stay, the removal is an entry of
    the chain, and the chain verifies from its signed anchor."""
    path = tmp_path / "a.jsonl"
    await write(path, signer, [entry(n, OLD) for n in range(12)])
    old_files = audit_files(path)
    assert len(old_files) >= 3
    await write(path, signer, [entry(n) for n in range(12, 30)], retention_days=30, prune_interval=0.0)
    remaining = [e["request_id"] for e in iter_audit_all(path) if e["method"] == "tools/call"]
    # The first new batch rotated the last old file out too: every old entry went, no new one.
    assert remaining == [f"r{n}" for n in range(12, 30)]
    (note,) = [e for e in iter_audit_all(path) if e["method"] == "audit/prune"]
    assert "retention 30 days" in note["reason"]
    report = verify_chain(path, load_public_key(tmp_path / "k.pem"))
    assert report.ok, report.problem
    assert report.first_seq and report.first_seq > 0


async def test_removing_the_oldest_file_without_the_anchor_fails(tmp_path: Path,
                                                                signer: CheckpointSigner) -> None:
    """Deleting the oldest file (or its first line) by hand is caught: nothing recorded the removal."""
    path = tmp_path / "a.jsonl"
    await write(path, signer, [entry(n) for n in range(20)])
    oldest = audit_files(path)[0]
    data = oldest.read_bytes().splitlines(keepends=True)
    oldest.write_bytes(b"".join(data[1:]))
    report = verify_chain(path)
    assert report.problem is not None and (report.problem.file, report.problem.line) == (oldest.name, 1)
    oldest.unlink()
    assert not verify_chain(path).ok


async def test_size_rotation_past_keep_carries_the_anchor(tmp_path: Path,
                                                          signer: CheckpointSigner) -> None:
    """Rotation dropping the oldest file beyond `keep` records the anchor, so the rest verifies."""
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, max_bytes=1500, keep=2, signer=signer) as writer:
        for n in range(30):
            await writer.write(entry(n))
    report = verify_chain(path, load_public_key(tmp_path / "k.pem"))
    assert report.ok and report.first_seq and report.first_seq > 0, report.problem
    unsigned = tmp_path / "u" / "b.jsonl"  # a writer without the key: its anchor is unsigned
    async with AuditWriter(unsigned, max_bytes=1500, keep=2) as writer:
        for n in range(30):
            await writer.write(entry(n))
    report = verify_chain(unsigned, load_public_key(tmp_path / "k.pem"))
    assert report.ok and report.unsigned_checkpoints >= 2, report.problem


async def test_holds_exempt_files_from_pruning(tmp_path: Path, signer: CheckpointSigner) -> None:
    """A subject hold keeps the files holding that subject's entries; a case hold keeps everything."""
    path = tmp_path / "a.jsonl"
    await write(path, signer, [entry(n, OLD, sub="bob" if n == 6 else "alice") for n in range(12)])
    set_hold(tmp_path, "case", "C-1", reason="litigation")
    await write(path, signer, [entry(12)], retention_days=30, prune_interval=0.0)
    assert "r0" in [e["request_id"] for e in iter_audit_all(path)]
    set_hold(tmp_path, "case", "C-1", held=False)
    set_hold(tmp_path, "sub", "bob")
    await write(path, signer, [entry(13)], retention_days=30, prune_interval=0.0)
    ids = [e["request_id"] for e in iter_audit_all(path)]
    assert "r6" in ids and "r0" not in ids
    bob_file = next(p for p in audit_files(path) if any(e["request_id"] == "r6" for e in iter_audit(p)))
    assert bob_file == audit_files(path)[0]
    assert verify_chain(path, load_public_key(tmp_path / "k.pem")).ok


def test_held_subject_found_across_read_chunks(tmp_path: Path) -> None:
    """The hold scan finds a subject whose entry straddles the scanner's 1 MiB read boundary."""
    needle = b'"sid":"0123456789abcdef"'
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"x" * ((1 << 20) - 7) + needle + b"\n")
    assert file_is_held(path, [needle]) and not file_is_held(path, [b'"sid":"fedcba"'])


def test_service_logs_rotate_per_run_and_expire(tmp_path: Path) -> None:
    """At start each live log moves aside stamped with its last write; rotated logs older than the
    window go, newer ones and live logs stay."""
    old, recent = tmp_path / "ext_authz-0.log", tmp_path / "files-0.log"
    old.write_text("decision log of an old run\n")
    recent.write_text("yesterday\n")
    os.utime(old, (0, time.time() - 40 * 86400))
    os.utime(recent, (0, time.time() - 86400))
    moved = rotate_logs(tmp_path)
    assert len(moved) == 2 and not old.exists() and not recent.exists()
    (tmp_path / "ext_authz-0.log").write_text("this run\n")
    removed = prune_logs(tmp_path, 30)
    assert [p.name.split(".log.")[0] for p in removed] == ["ext_authz-0"]
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["ext_authz-0", "files-0"]


async def test_writer_continues_after_the_anchor_when_no_file_is_left(
        tmp_path: Path, signer: CheckpointSigner) -> None:
    """With every file of a chain gone but its anchor, a new writer continues after the anchor
    (not from seq 0); verify still reports the checkpointed entries removed by hand."""
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, max_bytes=1500, keep=1, signer=signer) as writer:
        for n in range(20):
            await writer.write(entry(n))
    for p in audit_files(path):
        p.unlink()
    anchor = read_anchor(path)
    assert anchor is not None
    await write(path, signer, [entry(100)])
    (first,) = iter_audit(path)
    assert first["seq"] == anchor["seq"] + 1 and first["prev"] == anchor["hash"]
    report = verify_chain(path, load_public_key(tmp_path / "k.pem"))
    assert report.problem is not None and "truncated" in report.problem.message


async def test_rotating_out_a_pre_chain_file_and_a_bad_holds_file_keep_the_writer_up(
        tmp_path: Path, signer: CheckpointSigner) -> None:
    """Dropping a schema-1 file past `keep` needs no anchor, and an unreadable holds file stops
    pruning (nothing removed) but never the writer."""
    path = tmp_path / "a.jsonl"
    legacy = entry(0, OLD).to_line().replace(b'"v":2,"seq":0,"prev":"' + b"0" * 64 + b'",', b'"v":1,')
    path.write_bytes(legacy * 12)
    (tmp_path / "legal-holds.json").write_text("{not json")
    async with AuditWriter(path, max_bytes=1500, keep=1, signer=signer, retention_days=30,
                           prune_interval=0.0) as writer:
        for n in range(1, 30):
            await writer.write(entry(n, OLD))
    assert [e["request_id"] for e in iter_audit_all(path)][-1] == "r29"


async def test_a_stripped_anchor_signature_fails(tmp_path: Path, signer: CheckpointSigner) -> None:
    """The anchor a signing writer wrote after signed checkpoints must stay signed: one whose
    signature was removed (to move where the chain starts) fails verification."""
    import orjson

    from gateway.telemetry.audit_retention import anchor_path

    path = tmp_path / "a.jsonl"
    await write(path, signer, [entry(n, OLD) for n in range(12)])
    await write(path, signer, [entry(n) for n in range(12, 30)], retention_days=30, prune_interval=0.0)
    public = load_public_key(tmp_path / "k.pem")
    assert verify_chain(path, public).ok
    anchor = anchor_path(path)
    record = orjson.loads(anchor.read_bytes())
    assert record.get("sig") is not None
    record["sig"] = None
    anchor.write_bytes(orjson.dumps(record) + b"\n")
    report = verify_chain(path, public)
    assert report.problem is not None and "signature stripped" in report.problem.message
