"""SIGKILL under load loses no audit entry for a request whose answer reached the client, and the
chain the killed writer left still verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.telemetry.audit import SYNC_MODES, AuditFileReport, iter_audit
from gateway.telemetry.audit_verify import verify_chain

ROOT = Path(__file__).resolve().parents[3]
TOTAL = 300
CONCURRENCY = 16
KILL_AFTER = 100


async def _start_app(audit_path: Path, sync: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.gateway.telemetry.audit_app", str(audit_path), sync,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
    assert line.startswith(b"PORT "), line
    return proc, int(line.split()[1])


@pytest.mark.parametrize("sync", SYNC_MODES)
async def test_sigkill_under_load_loses_no_acknowledged_entry(tmp_path: Path, sync: str) -> None:
    """Every request id the client got an answer for is in the audit file after a SIGKILL mid-load,
    whether each batch is fsync'ed before its answer (batch) or only written to the kernel, with
    the fsync long after (interval: the kernel keeps what a killed process wrote)."""
    audit_path = tmp_path / "audit.jsonl"
    proc, port = await _start_app(audit_path, sync)
    acknowledged: list[str] = []
    failed = 0
    ids = iter(range(TOTAL))
    killed = False
    url = f"http://127.0.0.1:{port}/call"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

            async def worker() -> None:
                nonlocal failed, killed
                for n in ids:
                    rid = f"req-{n}"
                    try:
                        async with session.post(url, headers={"x-request-id": rid},
                                                json={"path": "/etc/motd", "password": f"pw{n}"}) as resp:
                            body = await resp.json()
                    except (TimeoutError, aiohttp.ClientError):
                        failed += 1
                        continue
                    if resp.status == 200 and body == {"request_id": rid}:
                        acknowledged.append(rid)
                    if len(acknowledged) >= KILL_AFTER and not killed:
                        killed = True
                        os.kill(proc.pid, signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout=60)
    finally:
        if proc.returncode is None and not killed:
            proc.kill()
        await asyncio.wait_for(proc.wait(), timeout=10)

    assert killed and proc.returncode == -signal.SIGKILL
    assert KILL_AFTER <= len(acknowledged) < TOTAL and failed > 0
    report = AuditFileReport()
    audited = {e["request_id"] for e in iter_audit(audit_path, report)}
    missing = set(acknowledged) - audited
    assert not missing, f"{len(missing)} acknowledged requests have no audit entry: {sorted(missing)[:5]}"
    assert report.entries == len(audited)
    chain = verify_chain(audit_path)
    assert chain.ok and chain.entries == report.entries, chain.problem
