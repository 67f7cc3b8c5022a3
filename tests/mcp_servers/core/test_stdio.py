"""``python -m mcp_servers.conformance --stdio`` as a real process, driven by the official SDK's stdio
client (``mcp.client.stdio``) and by raw JSON-RPC lines: one protocol era per connection, progress
and server-to-client requests on stdout, logs on stderr only, EOF ends the process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client

REPO = Path(__file__).resolve().parents[3]
CLIENT_INFO = types.Implementation(name="stdio-test", version="1.0")
SERVER = [sys.executable, "-m", "mcp_servers.conformance", "--stdio"]
EXIT_WAIT = 20.0
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {}}
INIT_PARAMS: dict[str, Any] = {"protocolVersion": "2025-11-25", "capabilities": {},
                               "clientInfo": {"name": "t", "version": "1"}}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS}


@asynccontextmanager
async def connect(tmp_path: Path, **callbacks: Any) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=SERVER[0], args=SERVER[1:], cwd=REPO)
    with (tmp_path / "server.stderr").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(
                read, write, client_info=CLIENT_INFO, **callbacks) as session:
            yield session


def text_of(result: object) -> str:
    assert isinstance(result, types.CallToolResult), result
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_initialize_list_and_call(tmp_path: Path) -> None:
    """The SDK client initializes a session over stdio, lists the tools and calls one."""
    async with connect(tmp_path) as session:
        init = await session.initialize()
        tools = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("test_simple_text", {})
        failed = await session.call_tool("test_error_handling", {})
    assert init.server_info.name == "mcp-conformance-server"
    assert session.protocol_version == "2025-11-25"
    assert {"test_simple_text", "test_sampling", "test_elicitation"} <= tools
    assert text_of(result) == "This is a simple text response for testing."
    assert isinstance(failed, types.CallToolResult) and failed.is_error
    # Logs went to stderr, as JSON lines.
    logged = [json.loads(line) for line in (tmp_path / "server.stderr").read_text().splitlines()]
    assert any(entry.get("message") == "session created" for entry in logged)


async def test_stateless_2026_connection(tmp_path: Path) -> None:
    """A connection whose first request is 2026-07-28 is stateless: discover, then list and call."""
    async with connect(tmp_path) as session:
        await session.discover()
        assert session.protocol_version == "2026-07-28"
        tools = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("test_simple_text", {})
    assert "test_simple_text" in tools
    assert text_of(result) == "This is a simple text response for testing."


async def test_progress_reaches_the_callback(tmp_path: Path) -> None:
    """Progress notifications are written to stdout before the answer and reach the callback."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(tmp_path) as session:
        await session.initialize()
        result = await session.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
    assert "Progress tool completed" in text_of(result)
    assert [(p, t) for p, t, _m in seen] == [(0, 100), (50, 100), (100, 100)]


async def test_sampling_and_elicitation_answered_by_client_callbacks(tmp_path: Path) -> None:
    """The server's own requests go out on stdout; the client's answers come back on stdin."""
    asked: list[str] = []

    async def sampling(_ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(f"sampling:{params.max_tokens}")
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text", text="sampled answer"))

    async def elicitation(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(f"elicitation:{getattr(params, 'message', '')}")
        return types.ElicitResult(action="accept", content={"username": "ada", "email": "ada@example.com"})

    async with connect(tmp_path, sampling_callback=sampling, elicitation_callback=elicitation) as session:
        await session.initialize()
        sampled = await session.call_tool("test_sampling", {"prompt": "hi"})
        elicited = await session.call_tool("test_elicitation", {"message": "who are you?"})
    assert text_of(sampled) == "LLM response: sampled answer"
    assert "action=accept" in text_of(elicited) and "ada@example.com" in text_of(elicited)
    assert asked == ["sampling:100", "elicitation:who are you?"]


def _exchange(lines: list[dict[str, Any] | str]) -> tuple[list[dict[str, Any]], int, str]:
    """Write ``lines`` to a fresh server, close stdin; (stdout messages, exit code, stderr)."""
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    run = subprocess.run(SERVER, input=data.encode(), capture_output=True, cwd=REPO, timeout=EXIT_WAIT,
                         check=False)
    out = run.stdout.decode()
    return [json.loads(line) for line in out.splitlines()], run.returncode, run.stderr.decode()


def _by_id(messages: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {m["id"]: m for m in messages if "id" in m}


def test_one_era_per_connection() -> None:
    """After initialize a 2026 envelope is -32600; after a 2026 request initialize is -32022."""
    handshake, code, _ = _exchange([INIT, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                                    {"jsonrpc": "2.0", "id": 2, "method": "tools/list",
                                     "params": {"_meta": MODERN_META}}])
    assert code == 0
    assert "result" in _by_id(handshake)[1]
    assert _by_id(handshake)[2]["error"]["code"] == -32600
    modern, code, _ = _exchange([{"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                                  "params": {"_meta": MODERN_META}}, {**INIT, "id": 2}])
    assert code == 0
    answers = _by_id(modern)
    assert answers[1]["result"]["resultType"] == "complete"
    assert answers[2]["error"]["code"] == -32022


def test_stdout_carries_json_rpc_only_and_eof_ends_the_process() -> None:
    """Bad lines get JSON-RPC errors; stdout holds nothing else; EOF exits 0 after the answers."""
    messages, code, stderr = _exchange([
        "not json",
        {"jsonrpc": "2.0", "id": 7, "method": "tools/list"},  # neither initialized nor 2026
        INIT,
        {"jsonrpc": "2.0", "id": 8, "method": "tools/call",
         "params": {"name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p"}}},
    ])
    assert code == 0, stderr[-2000:]
    assert all(m.get("jsonrpc") == "2.0" for m in messages)
    assert messages[0] == {"jsonrpc": "2.0", "id": None, "error": messages[0]["error"]}
    assert messages[0]["error"]["code"] == -32700
    answers = _by_id(messages)
    assert answers[7]["error"]["code"] == -32600
    assert answers[8]["result"]["content"][0]["text"] == "Progress tool completed (token p)"
    progress = [m for m in messages if m.get("method") == "notifications/progress"]
    assert len(progress) == 3
    assert messages.index(progress[-1]) < messages.index(answers[8])
    assert '"message":"stopped"' in stderr


def test_a_cancelled_request_gets_no_answer() -> None:
    """notifications/cancelled for a call waiting on sampling: the call is never answered, the
    connection goes on, and EOF with the sampling request unanswered still exits 0."""
    with subprocess.Popen(SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          cwd=REPO) as proc:
        assert proc.stdin is not None and proc.stdout is not None

        def send(message: dict[str, Any]) -> None:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()

        try:
            send({**INIT, "params": {**INIT_PARAMS, "capabilities": {"sampling": {}}}})
            assert "result" in json.loads(proc.stdout.readline())
            send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            send({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                  "params": {"name": "test_sampling", "arguments": {"prompt": "hi"}}})
            asked = json.loads(proc.stdout.readline())
            assert asked["method"] == "sampling/createMessage"
            send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}})
            send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
            proc.stdin.close()
            rest = [json.loads(line) for line in proc.stdout.read().decode().splitlines()]
            assert proc.wait(timeout=EXIT_WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rest == [{"jsonrpc": "2.0", "id": 3, "result": {}}]
