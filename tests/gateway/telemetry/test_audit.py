"""Audit trail: entries, group commit, rotation, torn tails, fail-closed behaviour, digest, export."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.telemetry.audit import (
    AuditCorrupt,
    AuditEntry,
    AuditFileReport,
    AuditUnavailable,
    AuditWriter,
    OtlpAuditExporter,
    _now_rfc3339,
    args_digest,
    audit_files,
    iter_audit,
    iter_audit_all,
)
from gateway.telemetry.audit_chain import CHECKPOINT_SUFFIX
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver


def entry(n: int, **overrides: object) -> AuditEntry:
    fields: dict[str, object] = dict(
        method="tools/call", server="files", target="read_file", sub="alice", client_id="vscode",
        tenant="acme", decision="allow", reason=None, status="ok", latency_ms=1.5,
        request_id=f"r{n}", decision_id=f"d{n}", args_digest=args_digest({"n": n}))
    fields.update(overrides)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def commits() -> float:
    return REGISTRY.get_sample_value("mcp_gateway_audit_commit_duration_seconds_count") or 0.0


async def test_entries_round_trip_with_stable_schema(tmp_path: Path) -> None:
    """Written entries read back with every field, the schema version and an RFC 3339 UTC ts."""
    path = tmp_path / "audit.jsonl"
    async with AuditWriter(path) as writer:
        await writer.write(entry(1, decision="deny", reason="tool_not_allowed", status="denied"))
    (got,) = list(iter_audit(path))
    assert got["v"] == 2 and got["request_id"] == "r1" and got["decision"] == "deny"
    assert got["reason"] == "tool_not_allowed" and got["sub"] == "alice" and got["tenant"] == "acme"
    assert got["args_digest"].startswith("sha256:") and got["ts"].endswith("Z")
    assert set(got) >= {"method", "server", "target", "client_id", "status", "latency_ms", "decision_id"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    """Concurrent writers are group-committed: fewer fsync'ed batches than entries, none lost."""
    before = commits()
    async with AuditWriter(tmp_path / "a.jsonl") as writer:
        await asyncio.gather(*(writer.write(entry(n)) for n in range(200)))
    assert commits() - before < 200
    assert [e["request_id"] for e in iter_audit(tmp_path / "a.jsonl")] == [f"r{n}" for n in range(200)]


async def test_rotation_keeps_n_files_and_newest_entries(tmp_path: Path) -> None:
    """Size rotation renames to .1..N, drops older files, and keeps a contiguous newest tail in order."""
    path = tmp_path / "audit.jsonl"
    line_len = len(entry(100).to_line()) + 2  # chained lines carry a seq of up to 3 digits
    async with AuditWriter(path, max_bytes=line_len * 5, keep=3) as writer:
        for n in range(100, 200):
            await writer.write(entry(n))
    assert [p.name for p in audit_files(path)] == ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1",
                                                    "audit.jsonl"]
    assert not (tmp_path / "audit.jsonl.4").exists()
    for p in audit_files(path):
        assert 0 < p.stat().st_size <= line_len * 5 + 10
    ids = [e["request_id"] for e in iter_audit_all(path)]
    assert ids == [f"r{n}" for n in range(200 - len(ids), 200)]
    assert len(ids) > 15


async def test_reopen_appends_and_drops_torn_tail(tmp_path: Path) -> None:
    """A torn tail left by a crash is skipped by the reader and truncated before new appends."""
    path = tmp_path / "audit.jsonl"
    async with AuditWriter(path) as writer:
        await writer.write(entry(1))
    with path.open("ab") as f:
        f.write(entry(2).to_line()[:40])
    report = AuditFileReport()
    assert [e["request_id"] for e in iter_audit(path, report)] == ["r1"]
    assert report.torn_tail and report.entries == 1
    async with AuditWriter(path) as writer:
        await writer.write(entry(3))
    report = AuditFileReport()
    assert [e["request_id"] for e in iter_audit(path, report)] == ["r1", "r3"]
    assert not report.torn_tail


def test_reader_rejects_corruption_before_last_line(tmp_path: Path) -> None:
    """A bad line that is not the last one is corruption, not a crash artefact."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(entry(1).to_line() + b"{not json\n" + entry(2).to_line())
    with pytest.raises(AuditCorrupt, match="line 2"):
        list(iter_audit(path))
    path.write_bytes(entry(1).to_line() + b"{torn but terminated\n")
    report = AuditFileReport()
    assert len(list(iter_audit(path, report))) == 1 and report.torn_tail


async def test_second_writer_on_same_file_refused(tmp_path: Path) -> None:
    """Two writers on one file would clobber each other's rotation, so the second is refused."""
    path = tmp_path / "audit.jsonl"
    async with AuditWriter(path):
        other = AuditWriter(path)
        with pytest.raises(AuditUnavailable, match="in use"):
            await other.start()


class _StuckDisk(AuditWriter):
    """Fault injection: fsync blocks until released, like a hung disk or NFS server."""

    release = threading.Event()

    def _sync(self, fd: int) -> None:
        if not self.release.wait(timeout=10):
            raise OSError(errno.EIO, "stuck")
        os.fsync(fd)


async def test_stuck_disk_fails_closed_with_backpressure(tmp_path: Path) -> None:
    """With fsync stuck, writes time out with AuditUnavailable and a full queue pushes back."""
    _StuckDisk.release.clear()
    writer = _StuckDisk(tmp_path / "a.jsonl", max_queue=2, timeout=0.2)
    await writer.start()
    try:
        results = await asyncio.gather(*(writer.write(entry(n)) for n in range(6)), return_exceptions=True)
        assert all(isinstance(r, AuditUnavailable) and r.http_status == 503 for r in results)
    finally:
        _StuckDisk.release.set()
        await writer.close()
    # Entries that were queued still land once the disk recovers; the callers never saw success.
    assert {e["request_id"] for e in iter_audit(tmp_path / "a.jsonl")} <= {f"r{n}" for n in range(6)}


async def test_stuck_disk_times_out_without_backpressure(tmp_path: Path) -> None:
    """With room in the queue, an entry that is not committed in time is refused (503, counted as
    rejected), and it still lands once the disk recovers."""
    _StuckDisk.release.clear()
    rejected = REGISTRY.get_sample_value("mcp_gateway_audit_entries_total", {"outcome": "rejected"}) or 0
    writer = _StuckDisk(tmp_path / "a.jsonl", timeout=0.2)
    await writer.start()
    try:
        with pytest.raises(AuditUnavailable) as info:
            await writer.write(entry(1))
        assert info.value.http_status == 503
        assert REGISTRY.get_sample_value("mcp_gateway_audit_entries_total",
                                         {"outcome": "rejected"}) == rejected + 1
    finally:
        _StuckDisk.release.set()
        await writer.close()
    assert [e["request_id"] for e in iter_audit(tmp_path / "a.jsonl")] == ["r1"]


async def test_each_entry_times_out_after_its_own_deadline(tmp_path: Path) -> None:
    """With fsync stuck, an entry written later than another times out later too (the writer's one
    timer re-arms for the next deadline), each about ``timeout`` after its own write."""
    _StuckDisk.release.clear()
    writer = _StuckDisk(tmp_path / "a.jsonl", timeout=0.4)
    await writer.start()
    loop = asyncio.get_running_loop()
    failed_at: dict[int, float] = {}

    async def write(n: int) -> None:
        with pytest.raises(AuditUnavailable):
            await writer.write(entry(n))
        failed_at[n] = loop.time()

    try:
        start = loop.time()
        first = asyncio.create_task(write(1))
        await asyncio.sleep(0.25)  # the delay between the two writes is the behaviour under test
        second_start = loop.time()
        await asyncio.wait_for(asyncio.gather(first, write(2)), 10)
    finally:
        _StuckDisk.release.set()
        await writer.close()
    assert 0.4 <= failed_at[1] - start < failed_at[2] - start
    assert failed_at[2] - second_start >= 0.4 and failed_at[2] > failed_at[1]


def test_entry_body_is_the_dataclass_serialization() -> None:
    """An entry's JSON is exactly orjson's serialization of every field of the dataclass (none
    left out by the written-out mapping), and its timestamp has the RFC 3339 form of before."""
    full = entry(1, reason="r", trace_id="t", service="s", latency_ms=2.5)
    assert full.body() == orjson.dumps(full)[1:] + b"\n"
    before = datetime.now(UTC)
    stamp = _now_rfc3339()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - timedelta(microseconds=1) <= parsed <= after + timedelta(microseconds=1)


class _FailingDisk(AuditWriter):
    """Fault injection: fsync reports EIO."""

    def _sync(self, fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")


async def test_fsync_failure_fails_closed_for_good(tmp_path: Path) -> None:
    """After an fsync error the writer refuses every later entry instead of retrying blindly."""
    writer = _FailingDisk(tmp_path / "a.jsonl")
    await writer.start()
    try:
        with pytest.raises(AuditUnavailable):
            await writer.write(entry(1))
        with pytest.raises(AuditUnavailable):
            await writer.write(entry(2))
    finally:
        await writer.close()
    with pytest.raises(AuditUnavailable):
        await writer.write(entry(3))


def test_digest_ignores_key_order_and_tracks_arguments() -> None:
    """The digest is canonical (key order irrelevant) and changes with non-secret arguments."""
    a = args_digest({"path": "/etc/motd", "opts": {"a": 1, "b": [1, 2.5, None, True]}})
    b = args_digest({"opts": {"b": [1, 2.5, None, True], "a": 1}, "path": "/etc/motd"})
    assert a == b and a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert args_digest({"path": "/etc/passwd"}) != a
    assert args_digest({"n": 1}) != args_digest({"n": 1.0}) != args_digest({"n": "1"})


JWT_A = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
JWT_B = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.b3RoZXJzaWc"


@pytest.mark.parametrize(("one", "other"), [
    ({"password": "hunter2"}, {"password": "letmein"}),
    ({"DB_Password": "hunter2"}, {"DB_Password": "letmein"}),
    ({"x-api-key": "k1"}, {"x-api-key": "k2"}),
    ({"refreshToken": "t1"}, {"refreshToken": "t2"}),
    ({"nested": [{"client_secret": "s1"}]}, {"nested": [{"client_secret": "s2"}]}),
    ({"header": "Bearer abc"}, {"header": "Bearer xyz"}),
    ({"q": JWT_A}, {"q": JWT_B}),
    ({"q": "ghp_" + "a" * 36}, {"q": "ghp_" + "b" * 36}),
    ({"q": "AKIAABCDEFGHIJKLMNOP"}, {"q": "AKIAPONMLKJIHGFEDCBA"}),
])
def test_digest_excludes_secrets(one: dict[str, object], other: dict[str, object]) -> None:
    """Secret keys and token-shaped values are redacted before hashing: the digest ignores their value."""
    assert args_digest({"path": "/x", **one}) == args_digest({"path": "/x", **other})
    assert args_digest({"path": "/x", **one}) != args_digest({"path": "/y", **one})


async def test_entry_never_contains_secret_argument_values(tmp_path: Path) -> None:
    """An audited call with a password and a bearer token leaves neither in the audit file."""
    path = tmp_path / "audit.jsonl"
    digest = args_digest({"user": "bob", "password": "s3cr3t-pw", "token": "Bearer abc.def.ghi"})
    async with AuditWriter(path) as writer:
        await writer.write(entry(1, args_digest=digest))
    raw = path.read_bytes()
    assert b"s3cr3t-pw" not in raw and b"abc.def.ghi" not in raw and b"bob" not in raw


def test_keyed_digest_and_deep_arguments() -> None:
    """A key turns the digest into an HMAC; 2000-deep arguments hash without recursion errors."""
    plain = args_digest({"ssn": "078-05-1120"})
    keyed = args_digest({"ssn": "078-05-1120"}, key=b"k1")
    assert keyed.startswith("hmac-sha256:") and keyed != plain
    assert keyed != args_digest({"ssn": "078-05-1120"}, key=b"k2")
    deep: object = "leaf"
    for _ in range(2000):
        deep = {"a": [deep]}
    assert args_digest(deep) != args_digest({"a": [{"a": ["leaf"]}]})
    with pytest.raises(TypeError):
        args_digest({"x": object()})


async def test_otlp_export_after_commit(tmp_path: Path, otlp_receiver: OtlpReceiver) -> None:
    """With an OTLP exporter, committed entries also reach a real OTLP logs receiver."""
    exporter = OtlpAuditExporter(otlp_receiver.endpoint, "ext_authz-test")
    writer = AuditWriter(tmp_path / "a.jsonl", exporter=exporter)
    await writer.start()
    await asyncio.gather(*(writer.write(entry(n)) for n in range(3)))
    await asyncio.to_thread(exporter.flush)
    await otlp_receiver.wait_for(lambda: len(otlp_receiver.logs) >= 3)
    await writer.close()
    got = {next(a.value.string_value for a in rec.attributes if a.key == "audit.request_id")
           for rec in otlp_receiver.logs}
    assert got == {"r0", "r1", "r2"}
    assert all(rec.event_name == "mcp.audit" for rec in otlp_receiver.logs)



class _CountingDisk(AuditWriter):
    """Counts fsyncs of the data file and records how many bytes it held at each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_syncs: list[int] = []

    def _sync(self, fd: int) -> None:
        if fd == self._fd:
            self.data_syncs.append(os.fstat(fd).st_size)
        super()._sync(fd)


async def test_interval_mode_answers_before_the_fsync_and_fsyncs_soon_after(tmp_path: Path) -> None:
    """sync=interval: write() returns once the entry is in the file (readable by another
    process, kept through a SIGKILL) with no fsync on the way; one fsync within the interval then
    covers every entry written before it."""
    path = tmp_path / "a.jsonl"
    writer = _CountingDisk(path, sync="interval", sync_interval=0.05)
    await writer.start()
    try:
        for n in range(5):
            await writer.write(entry(n))
            assert any(f'"request_id":"r{n}"' in line for line in path.read_text().splitlines())
        assert writer.data_syncs == []  # nothing fsync'ed on the answer's path
        size = path.stat().st_size
        async with asyncio.timeout(5):
            while not writer.data_syncs:
                await asyncio.sleep(0.01)  # bounded poll for the background fsync
        assert writer.data_syncs == [size]
    finally:
        await writer.close()


async def test_batch_mode_fsyncs_before_each_answer(tmp_path: Path) -> None:
    """sync=batch (the default): each write() returns after the fsync of its batch."""
    writer = _CountingDisk(tmp_path / "a.jsonl")
    await writer.start()
    try:
        for n in range(3):
            await writer.write(entry(n))
            assert len(writer.data_syncs) == n + 1
    finally:
        await writer.close()


async def test_interval_mode_makes_entries_durable_before_a_checkpoint_names_them(
        tmp_path: Path) -> None:
    """A checkpoint names the last entry's hash: in interval mode the data file is fsync'ed first,
    so no durable checkpoint ever names an entry a power loss could take away."""
    writer = _CountingDisk(tmp_path / "a.jsonl", sync="interval", sync_interval=60.0,
                           checkpoint_entries=3)
    await writer.start()
    try:
        for n in range(3):
            await writer.write(entry(n))
        assert writer.data_syncs == [(tmp_path / "a.jsonl").stat().st_size]
        assert (tmp_path / ("a.jsonl" + CHECKPOINT_SUFFIX)).read_text().count("\n") == 1
    finally:
        await writer.close()


class _FailingLaterDisk(AuditWriter):
    def _sync(self, fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")


async def test_interval_mode_fsync_failure_fails_closed(tmp_path: Path) -> None:
    """A failed background fsync refuses every later entry, as a failed write does."""
    writer = _FailingLaterDisk(tmp_path / "a.jsonl", sync="interval", sync_interval=0.02)
    await writer.start()
    try:
        await writer.write(entry(1))  # written; its fsync comes later and fails
        async with asyncio.timeout(5):
            while True:
                try:
                    await writer.write(entry(2))
                except AuditUnavailable:
                    break
                await asyncio.sleep(0.01)  # bounded poll until the failure is seen
    finally:
        with contextlib.suppress(OSError):
            await writer.close()


def test_sync_mode_is_validated(tmp_path: Path) -> None:
    """An unknown sync mode or an interval outside (0, 60] s is refused at construction."""
    with pytest.raises(ValueError, match="sync must be one of"):
        AuditWriter(tmp_path / "a.jsonl", sync="never")
    with pytest.raises(ValueError, match="sync_interval"):
        AuditWriter(tmp_path / "a.jsonl", sync="interval", sync_interval=0)


# --- the argument digest's one-call path gives the walk's bytes -----------------------------

_KEYS = ("a", "name", "Password", "api-Key", "x_TOKEN", "ſecret", "K", "otp", "note", "ß")
_STRINGS = ("", "hello", "Bearer abc", "eyJhbGciOi.eyJzdWIiOi.sig", "sk-" + "a" * 24,
            "ghp_" + "b" * 24, "AKIA" + "C" * 16, "ſk-" + "d" * 24, "-----BEGIN PRIVATE KEY-----x",
            "line\nbreak", "quote\"s", "ünïcode", "\u2028", "xoxb-1234567890ab", "Bearer\nabc",
            "bearer\tsecret-value", "api_key", "eyJhbGciOi.eyJzdWIiOi.sig\n", "sk-" + "e" * 24 + "\n")


def _walk_digest(arguments: Any, key: bytes | None) -> str:
    import hashlib
    import hmac

    from gateway.telemetry.audit import DEFAULT_SECRET_KEY_PARTS, _canonical_chunks
    h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for chunk in _canonical_chunks(arguments, DEFAULT_SECRET_KEY_PARTS):
        h.update(chunk)
    return ("hmac-sha256:" if key is not None else "sha256:") + h.hexdigest()


def _json_values() -> Any:
    from hypothesis import strategies as st
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=False) | st.sampled_from(_STRINGS) | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=4), max_leaves=20)


def test_the_one_call_digest_equals_the_walk() -> None:
    """args_digest takes one orjson call when nothing can need redaction; for every JSON value
    (secret keys and values, Unicode that case-folds onto ASCII, integers beyond 64 bits) it
    gives exactly the digest of the redacting walk, keyed and not."""
    from hypothesis import given, settings

    @settings(max_examples=400, deadline=None)
    @given(_json_values())
    def check(value: Any) -> None:
        for key in (None, b"k" * 32):
            assert args_digest(value, key=key) == _walk_digest(value, key)
    check()


def test_the_one_call_digest_is_taken_for_plain_arguments() -> None:
    """Plain ASCII arguments take the one-call path; a secret key, a secret-looking value or
    non-ASCII text takes the walk (which redacts)."""
    from gateway.telemetry.audit import DEFAULT_SECRET_KEY_PARTS, _plain_canonical
    assert _plain_canonical({"b": [1, 2.5, None], "a": "x"}, DEFAULT_SECRET_KEY_PARTS) == \
        b'{"a":"x","b":[1,2.5,null]}'
    for value in ({"api_key": "x"}, {"q": "Bearer abc"}, {"q": "ſk-" + "d" * 24}, {"n": 2**65},
                  {"q": "Bearer\nabc"}, {"q": "xoxb-1234567890ab"}, {"q": "eyJhbGciOi.eyJzdWIiOi.sig\n"}):
        assert _plain_canonical(value, DEFAULT_SECRET_KEY_PARTS) is None
    assert args_digest({"q": "ſk-" + "d" * 24}) == args_digest({"q": "sk-" + "e" * 24})  # both redacted
