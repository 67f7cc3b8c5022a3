"""Per-subject keys of the audit trail: sealing, erasure, new keys after erasure, wrong master key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.telemetry.audit import AuditEntry, AuditUnavailable, AuditWriter, iter_audit
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyStore, parse_master_key
from gateway.telemetry.audit_verify import verify_chain


def entry(n: int, sub: str | None) -> AuditEntry:
    return AuditEntry(method="tools/call", server="files", target="read_file", sub=sub, client_id="cli",
                      tenant="t1", decision="allow", reason=None, status="ok", latency_ms=1.0,
                      request_id=f"r{n}", decision_id=None, args_digest="sha256:abc")


async def test_sealed_entries_open_until_erased_then_a_new_key(tmp_path: Path) -> None:
    """An erased subject's old entries stay unreadable; their later entries use a new, readable key."""
    store = SubjectKeyStore(tmp_path, os.urandom(32), cache_ttl=0.0)
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
