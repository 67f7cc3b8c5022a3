"""Audit chain: every entry linked to the previous one, signed checkpoints, streaming verification."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.telemetry.audit import AuditEntry, AuditWriter, args_digest, audit_files
from gateway.telemetry.audit_chain import CheckpointSigner, generate_signing_key, load_public_key
from gateway.telemetry.audit_verify import ChainReport, verify_chain, verify_dir


def entry(n: int, sub: str = "alice") -> AuditEntry:
    return AuditEntry(method="tools/call", server="files", target=f"tool{n:04d}", sub=sub, client_id="vscode",
                      tenant="acme", decision="allow", reason=None, status="ok", latency_ms=1.5,
                      request_id=f"r{n}", decision_id=f"d{n}", args_digest=args_digest({"n": n}))


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "audit-signing.key"
    generate_signing_key(path)
    return path


async def write_trail(path: Path, key: Path | None, count: int = 40, *, max_bytes: int = 4000) -> None:
    signer = CheckpointSigner.from_file(key) if key else None
    async with AuditWriter(path, max_bytes=max_bytes, keep=50, signer=signer,
                           checkpoint_entries=7) as writer:
        for n in range(count):
            await writer.write(entry(n))


def check(path: Path, key: Path | None) -> ChainReport:
    return verify_chain(path, load_public_key(key) if key else None)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


async def test_clean_rotated_trail_verifies_with_signed_checkpoints(tmp_path: Path, key: Path) -> None:
    """A trail over several rotated files and a writer restart verifies; checkpoints are signed."""
    path = tmp_path / "audit" / "a.jsonl"
    await write_trail(path, key, 30)
    await write_trail(path, key, 15)  # restart: the chain continues from the last line
    assert len(audit_files(path)) >= 4
    report = check(path, key)
    assert report.ok, report.problem
    assert report.entries == 45 and report.first_seq == 0 and report.last_seq == 44
    assert report.signed_checkpoints >= 6


async def test_flipped_byte_names_the_altered_entry(tmp_path: Path, key: Path) -> None:
    """Changing one byte of an entry fails verification at that file and line."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 10, max_bytes=1 << 20)
    data = lines(path)
    data[3] = data[3].replace(b"tool0003", b"tool0004")
    path.write_bytes(b"".join(data))
    report = check(path, key)
    assert report.problem is not None and (report.problem.file, report.problem.line) == ("a.jsonl", 4)
    assert "altered" in report.problem.message


async def test_dropped_and_reordered_lines_are_named(tmp_path: Path, key: Path) -> None:
    """A removed line and two swapped lines each fail at the line where the chain breaks."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 10, max_bytes=1 << 20)
    original = lines(path)
    path.write_bytes(b"".join(original[:5] + original[6:]))
    report = check(path, key)
    assert report.problem is not None and report.problem.line == 6
    assert "seq 6 where 5" in report.problem.message
    path.write_bytes(b"".join(original[:2] + [original[3], original[2]] + original[4:]))
    report = check(path, key)
    assert report.problem is not None and report.problem.line == 3
    assert "out of place" in report.problem.message


async def test_inserted_line_is_named(tmp_path: Path, key: Path) -> None:
    """A copied-in line fails verification at the inserted line."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 10, max_bytes=1 << 20)
    original = lines(path)
    path.write_bytes(b"".join(original[:7] + [original[2]] + original[7:]))
    report = check(path, key)
    assert report.problem is not None and report.problem.line == 8


async def test_truncated_files_fail(tmp_path: Path, key: Path) -> None:
    """Cutting the newest entries off the current file, or a rotated file mid-line, fails."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 40)
    current = lines(path)
    path.write_bytes(b"".join(current[:-2]))
    report = check(path, key)
    assert report.problem is not None and "truncated" in report.problem.message
    path.write_bytes(b"".join(current))
    assert check(path, key).ok
    rotated = audit_files(path)[1]
    data = rotated.read_bytes()
    rotated.write_bytes(data[:-30])
    report = check(path, key)
    assert report.problem is not None and report.problem.file == rotated.name
    assert "truncated" in report.problem.message


async def test_deleted_middle_file_fails_at_next_file(tmp_path: Path, key: Path) -> None:
    """Removing a rotated file in the middle breaks the chain at the first line of the next file."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 40)
    files = audit_files(path)
    files[1].unlink()
    report = check(path, key)
    assert report.problem is not None and (report.problem.file, report.problem.line) == (files[2].name, 1)
    assert "missing" in report.problem.message


async def test_torn_tail_verifies_and_writer_resumes(tmp_path: Path, key: Path) -> None:
    """A half-written last line (crash mid-append) is tolerated; a restarted writer extends the chain."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 5, max_bytes=1 << 20)
    with path.open("ab") as f:
        f.write(b'{"v":2,"seq":5,"prev":"ab')
    report = check(path, key)
    assert report.ok and report.torn_tail and report.entries == 5
    await write_trail(path, key, 3, max_bytes=1 << 20)
    report = check(path, key)
    assert report.ok and not report.torn_tail and report.entries == 8


async def test_forged_checkpoint_and_wrong_key_fail(tmp_path: Path, key: Path) -> None:
    """Checkpoints must be signed by the gateway's key: another key fails, a stripped signature
    fails, a writer without the key is reported (and fails with require_signed)."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, key, 10, max_bytes=1 << 20)
    other = tmp_path / "other.key"
    generate_signing_key(other)
    report = check(path, other)
    assert report.problem is not None and "signature" in report.problem.message
    unsigned = tmp_path / "u" / "b.jsonl"
    await write_trail(unsigned, None, 10, max_bytes=1 << 20)
    assert verify_chain(unsigned).ok
    report = check(unsigned, key)
    assert report.ok and report.unsigned_checkpoints >= 1  # a writer without the key: reported
    report = verify_chain(unsigned, load_public_key(key), require_signed=True)
    assert report.problem is not None and "no signed checkpoint" in report.problem.message
    # Stripping a signature after which none follows is caught (the last checkpoint's).
    cps = path.with_name(path.name + ".checkpoints")
    records = [orjson.loads(line) for line in cps.read_bytes().splitlines()]
    assert len(records) >= 2
    records[-1]["sig"] = None
    cps.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    report = check(path, key)
    assert report.problem is not None and "signature stripped" in report.problem.message


async def test_a_trail_that_gains_a_signing_key_verifies_signed(tmp_path: Path, key: Path) -> None:
    """A writer without a key, then the same chain continued with one (signing turned on, as the
    default config now does): unsigned checkpoints before the first signed one are accepted,
    since its hash covers every earlier entry, and the chain passes require_signed."""
    path = tmp_path / "a.jsonl"
    await write_trail(path, None, 5, max_bytes=1 << 20)
    await write_trail(path, key, 5, max_bytes=1 << 20)
    report = verify_chain(path, load_public_key(key), require_signed=True)
    assert report.ok, report.problem
    assert report.entries == 10 and report.unsigned_checkpoints >= 1 and report.signed_checkpoints >= 1


async def test_verify_dir_checks_every_chain(tmp_path: Path, key: Path) -> None:
    """Each writer's file is its own chain; a broken one does not hide the others' results."""
    await write_trail(tmp_path / "a.jsonl", key, 5)
    await write_trail(tmp_path / "b.jsonl", key, 5)
    data = lines(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"".join(data[:1] + data[2:]))
    reports = {r.base.name: r for r in verify_dir(tmp_path, load_public_key(key))}
    assert reports["a.jsonl"].ok and not reports["b.jsonl"].ok
