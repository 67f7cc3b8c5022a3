"""Fixtures: a seeded SQLite file and, where the binaries exist, a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mcp_servers.database.backends import PostgresBackend
from mcp_servers.database.seed import seed_postgres, seed_sqlite

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    path = str(tmp_path / "demo.sqlite3")
    assert seed_sqlite(path) is True
    return path


def _pg_available() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL server binaries are not installed"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to own the cluster"
    return None


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throw-away cluster on a Unix socket (no TCP port), owned by 'postgres' when run as root."""
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp dir: that is private to root, and the server runs as 'postgres'.
    base = Path(tempfile.mkdtemp(prefix="mcp-pg-"))
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(base, user)
    data = base / "data"
    subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                    "-E", "UTF8"], check=True, capture_output=True, user=user, timeout=60)
    proc = subprocess.Popen(
        [str(PG_BIN / "postgres"), "-D", str(data), "-k", str(base), "-c", "listen_addresses=",
         "-c", "fsync=off", "-c", "max_connections=20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user)
    sock = base / ".s.PGSQL.5432"
    deadline = time.monotonic() + 30
    try:
        while True:
            ready = subprocess.run([str(PG_BIN / "pg_isready"), "-h", str(base), "-q"], check=False,
                                   timeout=10).returncode == 0
            if sock.exists() and ready:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.05)  # polling interval against a deadline, not a readiness guess
        yield f"postgresql://postgres@/postgres?host={base}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


# The PostgreSQL backend on the seeded test server.
@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PostgresBackend]:
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        await seed_postgres(conn)
    finally:
        await conn.close()
    db = PostgresBackend(postgres_dsn)
    await db.start()
    try:
        yield db
    finally:
        await db.close()
