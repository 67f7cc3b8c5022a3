"""The official MCP Python SDK client (mcp 2.3.0) against the real files and database servers.

Both servers run as subprocesses (``python -m mcp_servers.<name>``). Each protocol version is
driven explicitly, because the SDK's ``initialize()`` always proposes its newest handshake
version (2025-11-25) and ``Client(mode="auto")`` prefers ``server/discover`` (2026-07-28):

* 2025-06-18: a ``ClientSession`` sends ``initialize`` proposing 2025-06-18 and adopts the answer;
* 2025-11-25: ``ClientSession.initialize()`` (what ``Client(mode="legacy")`` does);
* 2026-07-28: ``ClientSession.discover()`` (stateless, no initialize; what ``mode="auto"`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession, types
from mcp.client.streamable_http import streamable_http_client

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ["2025-06-18", "2025-11-25", "2026-07-28"]
CLIENT_INFO = types.Implementation(name="sdk-client-test", version="1.0")


def _start(module: str, args: list[str], workdir: Path) -> Iterator[str]:
    """Start ``python -m module`` on a free loopback port and yield its MCP URL once /health answers."""
    env = {**os.environ, "MCP_STATE_DIR": str(workdir / "state"), "PYTHONUNBUFFERED": "1"}
    for _attempt in range(3):  # the free port can be taken between probe and bind: retry on exit
        port = free_port()
        log = (workdir / f"{module}.{port}.log").open("wb")
        argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        healthy = False
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    healthy = resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if healthy:
                break
            time.sleep(0.05)  # poll interval while waiting against the deadline
        if not healthy:
            proc.kill()
            proc.wait(timeout=10)
            log.close()
            continue
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()
        return
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in workdir.glob(f"{module}.*.log"))
    pytest.fail(f"{module} did not become healthy:\n{logs}")


@pytest.fixture(scope="module")
def files_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("files-server")
    yield from _start("mcp_servers.files", ["--root", str(work / "root"), "--seed-demo"], work)


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("database-server")
    yield from _start("mcp_servers.database", ["--sqlite-path", str(work / "demo.sqlite3")], work)


@asynccontextmanager
async def connect(url: str, version: str) -> AsyncIterator[ClientSession]:
    """An SDK session that negotiated exactly ``version``."""
    async with streamable_http_client(url) as (read, write), ClientSession(
            read, write, client_info=CLIENT_INFO) as session:
        if version == "2025-06-18":
            request = types.InitializeRequest(params=types.InitializeRequestParams(
                protocol_version=version, capabilities=types.ClientCapabilities(), client_info=CLIENT_INFO))
            result = await session.send_request(request, types.InitializeResult)
            session.adopt(result)
            await session.send_notification(types.InitializedNotification())
            assert result.protocol_version == version
        elif version == "2025-11-25":
            result = await session.initialize()
            assert result.protocol_version == version
        else:
            discovered = await session.discover()
            assert version in discovered.supported_versions
            assert session.initialize_result is None
        assert session.protocol_version == version
        yield session


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("version", VERSIONS)
async def test_files_server(files_url: str, version: str) -> None:
    """The SDK negotiates each version with the files server, lists its tools and calls them."""
    async with connect(files_url, version) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert {"list_directory", "stat", "read_file", "search"} <= set(tools)
        assert "write_file" not in tools
        assert tools["read_file"].annotations is not None and tools["read_file"].annotations.read_only_hint
        listing = await session.call_tool("list_directory", {"path": "."})
        assert isinstance(listing, types.CallToolResult) and not listing.is_error
        names = {e["name"] for e in (listing.structured_content or {})["entries"]}
        assert {"README.md", "docs"} <= names
        read = await session.call_tool("read_file", {"path": "docs/guide.md"})
        assert isinstance(read, types.CallToolResult) and "Search finds this line." in text_of(read)
        stat = await session.call_tool("stat", {"path": "README.md"})
        assert isinstance(stat, types.CallToolResult) and (stat.structured_content or {})["type"] == "file"
        escape = await session.call_tool("read_file", {"path": "../../etc/passwd"})
        assert isinstance(escape, types.CallToolResult) and escape.is_error is True
        resource = await session.read_resource("file:///README.md")
        assert resource.contents[0].text.startswith("# Demo sandbox")  # type: ignore[union-attr]


@pytest.mark.parametrize("version", VERSIONS)
async def test_database_server(database_url: str, version: str) -> None:
    """The SDK negotiates each version with the database server, lists its tools and calls them."""
    async with connect(database_url, version) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert tools == {"list_tables", "describe_table", "query"}
        listed = await session.call_tool("list_tables", {})
        assert isinstance(listed, types.CallToolResult) and not listed.is_error
        assert "customers" in {t["name"] for t in (listed.structured_content or {})["tables"]}
        res = await session.call_tool("query", {"sql": "SELECT count(*) AS n FROM orders WHERE tenant = ?",
                                                "params": ["acme"]})
        assert isinstance(res, types.CallToolResult) and not res.is_error
        assert json.loads(text_of(res))["columns"] == ["n"]
        write = await session.call_tool("query", {"sql": "DELETE FROM orders"})
        assert isinstance(write, types.CallToolResult) and write.is_error is True
        after = await session.call_tool("query", {"sql": "SELECT count(*) FROM orders"})
        assert isinstance(after, types.CallToolResult) and (after.structured_content or {})["rows"] == [[30]]


@pytest.mark.parametrize(("mode", "expected"), [("legacy", "2025-11-25"), ("auto", "2026-07-28")])
async def test_high_level_client_modes(database_url: str, mode: str, expected: str) -> None:
    """The high-level Client lands on 2025-11-25 in legacy mode and on 2026-07-28 when probing."""
    async with Client(database_url, mode=mode) as client:
        assert client.protocol_version == expected
        result = await client.call_tool("describe_table", {"table": "orders"})
        assert not result.is_error
