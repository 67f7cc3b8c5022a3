"""Fixtures: a seeded sandbox with real symlinks, served over real HTTP on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from mcp_servers.core import MCPServer, ServerSettings, make_app
from mcp_servers.files.sandbox import seed_demo


@asynccontextmanager
async def serve(server: MCPServer) -> AsyncIterator[str]:
    """Run ``server`` on 127.0.0.1 with an ephemeral port; yield its MCP endpoint URL."""
    runner = web.AppRunner(make_app(server, ServerSettings()))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/mcp"
    finally:
        await runner.cleanup()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("TOP SECRET needle\n")
    return d


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    r = tmp_path / "root"
    seed_demo(r)
    (r / "escape_file").symlink_to(outside / "secret.txt")
    (r / "escape_dir").symlink_to(outside)
    (r / "blob.bin").write_bytes(bytes(range(256)))
    (r / "with space.txt").write_text("spaced\n")
    return r
