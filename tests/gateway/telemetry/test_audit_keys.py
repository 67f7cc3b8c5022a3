"""Per-subject keys of the audit trail: sealing, erasure, new keys after erasure, wrong master key."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path

import orjson
import pytest

from gateway.telemetry.audit import AuditEntry, AuditUnavailable, AuditWriter, iter_audit
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyStore, parse_master_key
from gateway.telemetry.audit_verify import verify_chain

ROOT = Path(__file__).resolve().parents[3]


def entry(n: int, sub: str | None) -> AuditEntry:
    return AuditEntry(method="tools/call", server="files", target="read_file", sub=sub, client_id="cli",
                      tenant="t1", decision="allow", reason=None, status="ok", latency_ms=1.0,
                      request_id=f"r{n}", decision_id=None, args_digest="sha256:abc")


async def test_sealed_entries_open_until_erased_then_a_new_key(tmp_path: Path) -> None:
    """An erased subject's old entries stay unreadable; their later entries use a new, readable key."""
    store = SubjectKeyStore(tmp_path, os.urandom(32))
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, keys=store) as writer:
        await writer.write(entry(0, "carol"))
        await writer.write(entry(1, None))  # no subject: nothing personal to seal
        store.erase("carol")
        await writer.write(entry(2, "carol"))
    first, anonymous, again = iter_audit(path)
    assert first["sub"] is None and first["sid"] == store.subject_id("carol")
    assert store.open(first) is None
    assert anonymous["client_id"] == "cli" and "pii" not in anonymous
    assert store.open(again) == {"sub": "carol", "client_id": "cli", "tenant": "t1",
                                 "args_digest": "sha256:abc"}
    assert again["pii"].startswith("2:") and verify_chain(path).ok
    # A sealed entry has every key of an unsealed one, in the same order, plus sid and pii.
    assert list(first) == [*anonymous, "sid", "pii"]
    store.close()


def test_wrong_master_key_is_refused(tmp_path: Path) -> None:
    """Keys wrapped under one master key do not unwrap under another: a clear error, not garbage."""
    SubjectKeyStore(tmp_path, b"k" * 32).key_for("dave")
    with pytest.raises(KeyStoreError, match="master_key"):
        SubjectKeyStore(tmp_path, b"x" * 32).key_for("dave")
    with pytest.raises(KeyStoreError, match="32 bytes"):
        parse_master_key("c2hvcnQ")


async def test_key_store_failure_fails_closed_and_keeps_the_chain(tmp_path: Path) -> None:
    """A key store that cannot seal refuses the entry (AuditUnavailable); later entries chain on."""
    store = SubjectKeyStore(tmp_path, os.urandom(32))
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, keys=store) as writer:
        await writer.write(entry(0, "erin"))
        store.close()
        with pytest.raises(AuditUnavailable):
            await writer.write(entry(1, "frank"))
        await writer.write(entry(2, None))
    assert [e["request_id"] for e in iter_audit(path)] == ["r0", "r2"] and verify_chain(path).ok


async def test_erase_in_another_process_reaches_a_writer_that_cached_the_key(tmp_path: Path) -> None:
    """A subject erased by another process (``audit erase``) while a running writer holds its key in
    memory: the writer's next entry of that subject is sealed under a new key (readable), not the
    erased one, and the writer no longer holds the erased key."""
    master = os.urandom(32)
    store = SubjectKeyStore(tmp_path, master)
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, keys=store) as writer:
        await writer.write(entry(0, "carol"))
        assert store.cached_subjects() == 1
        script = ("import sys; from pathlib import Path; "
                  "from gateway.telemetry.audit_keys import SubjectKeyStore; "
                  "print(SubjectKeyStore(Path(sys.argv[1]), bytes.fromhex(sys.argv[2])).erase('carol')[1])")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(tmp_path), master.hex(),
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0 and out.strip() == b"1"
        await writer.write(entry(1, "carol"))
        assert store.cached_subjects() == 1  # the erased key was dropped, the new one loaded
    before, after = iter_audit(path)
    assert before["pii"].startswith("1:") and store.open(before) is None
    assert after["pii"].startswith("2:") and store.open(after) == {
        "sub": "carol", "client_id": "cli", "tenant": "t1", "args_digest": "sha256:abc"}
    assert verify_chain(path).ok
    store.close()


def test_key_cache_is_bounded_and_keeps_the_recently_used(tmp_path: Path) -> None:
    """The writer's key cache holds at most cache_size subjects, evicting the least recently used;
    an evicted subject's key is read back from the store (same key: its entries stay readable)."""
    store = SubjectKeyStore(tmp_path, os.urandom(32), cache_size=3)
    sealed = {sub: store.seal({"sub": sub}, sub) for sub in ("a", "b", "c")}
    store.seal({"sub": "a"}, "a")  # a is now the most recently used: b goes first
    store.seal({"sub": "d"}, "d")
    assert store.cached_subjects() == 3
    assert list(store._cache) == ["c", "a", "d"]  # least recently used first
    for sub in ("e", "f", "g", "h"):
        store.seal({"sub": sub}, sub)
    assert store.cached_subjects() == 3
    sid, pii = sealed["b"]
    assert store.open({"sid": sid.decode(), "pii": pii.decode()}) == {"sub": "b"}
    assert store.key_for("b")[1] == 1  # read back, not a new key
    store.close()


def test_nonces_never_repeat_within_or_across_batches_and_stores(tmp_path: Path) -> None:
    """Nonces of one subject's key are distinct within a batch, across batches and across two
    stores (two processes) sealing the same subject."""
    master = os.urandom(32)
    stores = [SubjectKeyStore(tmp_path, master), SubjectKeyStore(tmp_path, master)]
    nonces = []
    for _ in range(20):
        for store in stores:
            with store.sealing({"zoe"}) as seal:
                for _ in range(50):
                    _, pii = seal("zoe", b"{}")
                    nonces.append(base64.b64decode(pii.split(b":", 1)[1])[:12])
    assert len(nonces) == 2000 and len(set(nonces)) == 2000
    for store in stores:
        store.close()


def test_new_subjects_of_a_batch_get_their_keys_in_one_commit(tmp_path: Path) -> None:
    """A batch with many new subjects creates their keys in one transaction (one journal fsync),
    not one per subject; every entry opens with its own subject's key."""
    store = SubjectKeyStore(tmp_path, os.urandom(32))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    subjects = [f"user{n}" for n in range(40)]
    with store.sealing(set(subjects)) as seal:
        sealed = [seal(sub, orjson.dumps({"sub": sub})) for sub in subjects]
    assert statements.count("COMMIT") == 1
    for sub, (sid, pii) in zip(subjects, sealed, strict=True):
        assert store.open({"sid": sid.decode(), "pii": pii.decode()}) == {"sub": sub}
    store.close()


@pytest.mark.parametrize("probe", ["header", "data_version"])
def test_erasure_by_another_connection_is_seen_before_the_next_batch(tmp_path: Path, probe: str) -> None:
    """An erasure committed by another connection drops the cached key before the next batch, seen
    by the store file's change counter (rollback journal) or, for a file not in that mode, by
    SQLite's data_version; a batch with no change in between keeps the key."""
    master = os.urandom(32)
    writer, eraser = SubjectKeyStore(tmp_path, master), SubjectKeyStore(tmp_path, master)
    assert writer._header_fd >= 0
    if probe == "data_version":  # what a store in WAL mode uses
        os.close(writer._header_fd)
        writer._header_fd = -1
        writer._version = writer._change_version()
    with writer.sealing({"ivy"}) as seal:
        sid, first = seal("ivy", b"{}")
    with writer.sealing({"ivy"}) as seal:  # nothing changed: the cached key seals
        assert seal("ivy", b"{}")[1].startswith(b"1:")
    assert eraser.erase("ivy") == (sid.decode(), 1)
    with writer.sealing({"ivy"}) as seal:
        _, second = seal("ivy", b"{}")
    assert first.startswith(b"1:") and second.startswith(b"2:")
    writer.close()
    eraser.close()


async def test_a_full_key_cache_still_seals_every_subject_of_a_batch(tmp_path: Path) -> None:
    """With the cache full, loading a batch's new subjects may evict another subject of the same
    batch: its entry is still sealed (its key read back), the writer keeps running, and every
    entry opens with its own subject's key."""
    store = SubjectKeyStore(tmp_path, os.urandom(32), cache_size=2)
    path = tmp_path / "a.jsonl"
    async with AuditWriter(path, keys=store) as writer:
        await writer.write(entry(0, "ann"))
        await writer.write(entry(1, "cid"))  # ann is now the least recently used
        # One batch with ann (cached) and two new subjects: loading them evicts ann.
        await asyncio.gather(*(writer.write(entry(n, sub)) for n, sub in
                               ((2, "ann"), (3, "ben"), (4, "dee"))))
        await writer.write(entry(5, "ann"))
    opened = {e["request_id"]: store.open(e) for e in iter_audit(path)}
    assert {r: f["sub"] for r, f in opened.items() if f} == {
        "r0": "ann", "r1": "cid", "r2": "ann", "r3": "ben", "r4": "dee", "r5": "ann"}
    assert store.cached_subjects() == 2 and verify_chain(path).ok
    store.close()
