"""The bridge as a real process in front of real stdio servers, driven by the official SDK client.

Servers: ``mcp-server-time`` (PyPI, speaks 2026-07-28 itself: a *modern* pool),
``@modelcontextprotocol/server-everything`` (npm, handshake era only: a *translated* pool and
server-to-client requests), and ``toy_server.py`` (misbehaving on purpose).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.mcp_bridge.conftest import RunningBridge, run_bridge

VERSIONS = ["2025-06-18", "2025-11-25", "2026-07-28"]
CLIENT_INFO = types.Implementation(name="bridge-test", version="1.0")
WAIT = 20.0
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@asynccontextmanager
async def connect(url: str, version: str, *, terminate_on_close: bool = True,
                  **callbacks: Any) -> AsyncIterator[ClientSession]:
    """An SDK session that negotiated exactly ``version`` (see tests/mcp_servers/test_sdk_clients)."""
    transport = streamable_http_client(url, terminate_on_close=terminate_on_close)
    async with transport as (read, write), ClientSession(
            read, write, client_info=CLIENT_INFO, **callbacks) as session:
        if version == "2025-06-18":
            request = types.InitializeRequest(params=types.InitializeRequestParams(
                protocol_version=version, capabilities=types.ClientCapabilities(), client_info=CLIENT_INFO))
            result = await session.send_request(request, types.InitializeResult)
            session.adopt(result)
            await session.send_notification(types.InitializedNotification())
        elif version == "2025-11-25":
            await session.initialize()
        else:
            await session.discover()
        assert session.protocol_version == version
        yield session


def text_of(result: object) -> str:
    assert isinstance(result, types.CallToolResult)
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.fixture(scope="module")
def time_bridge(tmp_path_factory: pytest.TempPathFactory, time_argv: list[str]) -> Iterator[RunningBridge]:
    with run_bridge(tmp_path_factory.mktemp("time"), time_argv, "--pool", "1") as bridge:
        yield bridge


@pytest.fixture(scope="module")
def everything_bridge(tmp_path_factory: pytest.TempPathFactory,
                      everything_argv: list[str]) -> Iterator[RunningBridge]:
    with run_bridge(tmp_path_factory.mktemp("everything"), everything_argv, "--pool", "1",
                    "--env", "BRIDGE_TEST_SECRET", env={"BRIDGE_TEST_SECRET": "s3cret",
                                                        "BRIDGE_TEST_HIDDEN": "hidden"}) as bridge:
        yield bridge


@pytest.mark.parametrize("version", VERSIONS)
async def test_time_server_every_version(time_bridge: RunningBridge, version: str) -> None:
    """mcp-server-time lists and calls its tools through the bridge in every protocol version."""
    async with connect(time_bridge.url, version) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"get_current_time", "convert_time"} <= tools
        result = await session.call_tool("get_current_time", {"timezone": "UTC"})
        assert not result.is_error
        assert json.loads(text_of(result))["timezone"] == "UTC"


@pytest.mark.parametrize("version", VERSIONS)
async def test_everything_server_every_version(everything_bridge: RunningBridge, version: str) -> None:
    """server-everything (handshake era only) answers stateless clients through a translated pool."""
    async with connect(everything_bridge.url, version) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools
        result = await session.call_tool("get-sum", {"a": 2, "b": 3})
        assert "5" in text_of(result)


@pytest.mark.parametrize("version", ["2025-11-25", "2026-07-28"])
async def test_progress_arrives_over_sse(everything_bridge: RunningBridge, version: str) -> None:
    """Progress notifications of a long call reach the client's progress callback."""
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with connect(everything_bridge.url, version) as session:
        result = await session.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                         progress_callback=on_progress)
        assert "completed" in text_of(result)
    assert seen == [(1, 3), (2, 3), (3, 3)]


async def test_server_requests_reach_client_callbacks(everything_bridge: RunningBridge) -> None:
    """Sampling, elicitation and roots/list from the child reach the SDK client's callbacks."""
    calls: list[str] = []

    async def sampling(_ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        calls.append("sampling")
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text", text="sampled answer"))

    async def elicitation(_ctx: Any, _params: types.ElicitRequestParams) -> types.ElicitResult:
        calls.append("elicitation")
        return types.ElicitResult(action="accept", content={"name": "Ada", "check": True})

    async def roots(_ctx: Any) -> types.ListRootsResult:
        calls.append("roots")
        return types.ListRootsResult(roots=[types.Root.model_validate({"uri": "file:///srv/project",
                                                                      "name": "project"})])

    async with connect(everything_bridge.url, "2025-11-25", sampling_callback=sampling,
                       elicitation_callback=elicitation, list_roots_callback=roots) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= tools
        sampled = await session.call_tool("trigger-sampling-request", {"prompt": "hi"})
        assert "sampled answer" in text_of(sampled)
        elicited = await session.call_tool("trigger-elicitation-request", {})
        assert "Ada" in text_of(elicited)
        listed = await session.call_tool("get-roots-list", {})
        assert "file:///srv/project" in text_of(listed)
    assert {"sampling", "elicitation", "roots"} <= set(calls)


async def test_child_environment_is_the_allowlist(everything_bridge: RunningBridge) -> None:
    """get-env shows the allowlisted variables and the one named with --env, nothing else."""
    async with connect(everything_bridge.url, "2025-11-25") as session:
        env = json.loads(text_of(await session.call_tool("get-env", {})))
    assert env["BRIDGE_TEST_SECRET"] == "s3cret"
    assert "BRIDGE_TEST_HIDDEN" not in env
    assert set(env) <= {"HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TZ",
                        "BRIDGE_TEST_SECRET"}


async def _session_child(bridge: RunningBridge, *, in_flight: int = 0) -> int:
    """The pid of the only session's child, once it has ``in_flight`` requests (bounded poll)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        sessions = list(bridge.children()["sessions"].values())
        if len(sessions) == 1 and sessions[0]["pid"] and sessions[0]["in_flight"] >= in_flight:
            return int(sessions[0]["pid"])
        await asyncio.sleep(0.02)  # poll interval against the deadline
    pytest.fail(f"no session child with {in_flight} request(s) in flight: {bridge.children()}")


async def test_killed_child_gives_error_and_the_session_recovers(
        tmp_path: Path, everything_argv: list[str]) -> None:
    """SIGKILL of the child mid-call: the call gets -32603 upstream_exited; the next call succeeds."""
    with run_bridge(tmp_path, everything_argv, "--pool", "0") as bridge:
        async with connect(bridge.url, "2025-11-25") as session:
            first = asyncio.create_task(session.call_tool("trigger-long-running-operation",
                                                          {"duration": 30, "steps": 30}))
            pid = await _session_child(bridge, in_flight=1)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(MCPError) as failed:
                await asyncio.wait_for(first, WAIT)
            assert failed.value.code == -32603
            assert failed.value.data["reason"] == "upstream_exited"
            assert failed.value.data["exit_status"] == -signal.SIGKILL
            again = await asyncio.wait_for(session.call_tool("echo", {"message": "back"}), WAIT)
            assert "back" in text_of(again)
            assert await _session_child(bridge) != pid


async def test_sigterm_drains_and_stops_every_child(tmp_path: Path, everything_argv: list[str]) -> None:
    """SIGTERM: the call in flight still gets its answer, then the bridge stops its children
    (session and pool) and exits 0."""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    with run_bridge(tmp_path, everything_argv, "--pool", "1", "--drain-seconds", "10") as bridge:
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url, json=INIT, headers=headers) as init:
                headers["Mcp-Session-Id"] = init.headers["Mcp-Session-Id"]
            initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            async with http.post(bridge.url, json=initialized, headers=headers) as ack:
                assert ack.status == 202
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                "name": "trigger-long-running-operation", "arguments": {"duration": 1, "steps": 2}}}
            answer = asyncio.create_task(http.post(bridge.url, json=call, headers=headers))
            await _session_child(bridge, in_flight=1)
            children = bridge.children()
            pids = [c["pid"] for c in [*children["sessions"].values(), *children["pool"]]]
            assert len(pids) == 2 and all(pids)
            bridge.proc.send_signal(signal.SIGTERM)
            async with await asyncio.wait_for(answer, WAIT) as response:
                assert response.status == 200
                assert "completed" in (await response.json())["result"]["content"][0]["text"]
            assert await asyncio.to_thread(bridge.proc.wait, WAIT) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


async def test_bad_stdout_is_survived(tmp_path: Path, toy_argv: list[str]) -> None:
    """A non-JSON stdout line is skipped; an oversize line kills the child, the call gets
    upstream_protocol_error, and the session carries on with a new child."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    with run_bridge(tmp_path, toy_argv, "--pool", "0", "--max-line-bytes", "65536",
                    "--workdir", str(workdir)) as bridge:
        async with connect(bridge.url, "2025-11-25") as session:
            assert text_of(await session.call_tool("cwd", {})) == str(workdir)
            assert text_of(await session.call_tool("noise", {})) == "quiet again"
            before = text_of(await session.call_tool("pid", {}))
            with pytest.raises(MCPError) as failed:
                await asyncio.wait_for(session.call_tool("huge", {}), WAIT)
            assert failed.value.code == -32603
            assert failed.value.data["reason"] == "upstream_protocol_error"
            after = text_of(await asyncio.wait_for(session.call_tool("pid", {}), WAIT))
            assert after != before
        logs = bridge.logs()
    assert "skipped a stdout line that is not a JSON-RPC message" in logs
    assert "toy server starting" in logs  # the child's stderr is in the bridge's log


async def test_session_limit_answers_503(tmp_path: Path, toy_argv: list[str]) -> None:
    """Past --max-sessions, initialize gets 503 session_limit with Retry-After; DELETE frees a slot."""
    init = INIT
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with run_bridge(tmp_path, toy_argv, "--pool", "0", "--max-sessions", "1") as bridge:
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url, json=init, headers=headers) as first:
                assert first.status == 200
                sid = first.headers["Mcp-Session-Id"]
            async with http.post(bridge.url, json=init, headers=headers) as second:
                assert second.status == 503
                assert second.headers["Retry-After"].isdigit()
                assert (await second.json())["error"]["data"]["reason"] == "session_limit"
            async with http.delete(bridge.url, headers={"Mcp-Session-Id": sid}) as gone:
                assert gone.status == 200
            async with http.post(bridge.url, json=init, headers=headers) as third:
                assert third.status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}/metrics", timeout=5) as resp:
                assert b'mcp_bridge_rejected_total{reason="session_limit"} 1' in resp.read()


async def test_cancellation_reaches_the_child_with_its_own_id(tmp_path: Path, toy_argv: list[str]) -> None:
    """A client's notifications/cancelled reaches the child naming the id the child saw."""
    with run_bridge(tmp_path, toy_argv, "--pool", "0") as bridge:
        async with connect(bridge.url, "2025-11-25") as session:
            with pytest.raises(MCPError):  # the SDK cancels after its read timeout
                await session.call_tool("hang", {}, read_timeout_seconds=0.3)
            deadline = time.monotonic() + WAIT
            seen: dict[str, list[Any]] = {"hung": [], "cancelled": []}
            while time.monotonic() < deadline and not seen["cancelled"]:
                seen = json.loads(text_of(await session.call_tool("seen", {})))
            assert seen["hung"] and seen["cancelled"] == seen["hung"]
            assert bridge.children()["sessions"].popitem()[1]["in_flight"] == 0


def _modern(method: str, params: dict[str, Any],
            name: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"jsonrpc": "2.0", "id": "r1", "method": method, "params": {
        **params, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                            "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return body, headers


async def test_stateless_call_on_a_crashing_child_is_502_then_recovers(
        tmp_path: Path, toy_argv: list[str]) -> None:
    """A 2026-07-28 call whose pool child exits gets HTTP 502 with upstream_exited; the pool
    child is restarted and the next stateless call is answered."""
    with run_bridge(tmp_path, toy_argv, "--pool", "1") as bridge:
        async with aiohttp.ClientSession() as http:
            body, headers = _modern("tools/call", {"name": "exit", "arguments": {}}, "exit")
            async with http.post(bridge.url, json=body, headers=headers) as crashed:
                assert crashed.status == 502
                error = (await crashed.json())["error"]
            assert error["code"] == -32603 and error["data"]["reason"] == "upstream_exited"
            assert error["data"]["exit_status"] == 7
            body, headers = _modern("tools/list", {})
            async with http.post(bridge.url, json=body, headers=headers) as listed:
                assert listed.status == 200
                result = (await listed.json())["result"]
            assert result["resultType"] == "complete" and "pid" in {t["name"] for t in result["tools"]}


async def test_ready_is_503_while_crash_looping(tmp_path: Path, toy_argv: list[str]) -> None:
    """A server that exits at start never makes the bridge ready; /ready says it is crash-looping."""
    with run_bridge(tmp_path, [*toy_argv, "--exit-at-start"], "--pool", "1", "--restart-backoff", "0.05",
                    wait_ready=False) as bridge:
        deadline = time.monotonic() + WAIT
        status, body = bridge.get("/ready")
        while time.monotonic() < deadline and body["reason"] != "crash-looping":
            assert status == 503
            await asyncio.sleep(0.05)  # poll interval against the deadline
            status, body = bridge.get("/ready")
        assert (status, body["reason"]) == (503, "crash-looping")


async def test_children_die_with_a_killed_bridge(tmp_path: Path, toy_argv: list[str]) -> None:
    """SIGKILL of the bridge (no chance to clean up): the parent-death signal ends its children,
    even one that outlives the end of its stdin."""
    with run_bridge(tmp_path, [*toy_argv, "--linger"], "--pool", "1") as bridge:
        pid = bridge.children()["pool"][0]["pid"]
        assert pid and _state(pid) not in (None, "Z")
        bridge.proc.kill()
        bridge.proc.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while _state(pid) not in (None, "Z") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # poll interval against the deadline
        assert _state(pid) in (None, "Z")


async def test_logging_and_list_changed_reach_the_client(tmp_path: Path, toy_argv: list[str]) -> None:
    """A child's log message and tools/list_changed arrive on the session's GET stream."""
    logged: asyncio.Queue[Any] = asyncio.Queue()
    changed = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.put_nowait(params.data)

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    with run_bridge(tmp_path, toy_argv, "--pool", "0") as bridge:
        async with connect(bridge.url, "2025-11-25", logging_callback=on_log,
                           message_handler=on_message) as session:
            assert text_of(await session.call_tool("chatty", {})) == "said it"
            assert await asyncio.wait_for(logged.get(), WAIT) == "hello from stdio"
            await asyncio.wait_for(changed.wait(), WAIT)


async def test_foreign_host_and_origin_are_refused(tmp_path: Path, toy_argv: list[str]) -> None:
    """DNS rebinding protection: a foreign Host gets 421, a foreign Origin 403, before any child."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with run_bridge(tmp_path, toy_argv, "--pool", "0") as bridge:
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url, json=INIT, headers={**headers, "Host": "evil.example"}) as host:
                assert host.status == 421
            async with http.post(bridge.url, json=INIT,
                                 headers={**headers, "Origin": "https://evil.example"}) as origin:
                assert origin.status == 403
            async with http.post(bridge.url, json=INIT,
                                 headers={**headers, "Origin": f"http://localhost:{bridge.port}"}) as ok:
                assert ok.status == 200
        assert len(bridge.children()["sessions"]) == 1


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def test_a_dead_leader_takes_its_grandchild_along(tmp_path: Path, toy_argv: list[str]) -> None:
    """When the spawned process dies but its own child holds the pipes (sh -c, npx -> node), the
    bridge still sees the exit, kills and reaps the grandchild, and starts a new child."""
    script = " ".join([*toy_argv, "--linger"]) + "; true"
    with run_bridge(tmp_path, ["sh", "-c", script], "--pool", "1", "--restart-backoff", "0.05") as bridge:
        leader = bridge.children()["pool"][0]["pid"]
        grandchildren = _children_of(leader)
        assert len(grandchildren) == 1
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        slot = bridge.children()["pool"][0]
        while time.monotonic() < deadline and not (slot["ready"] and slot["pid"] not in (None, leader)):
            await asyncio.sleep(0.05)  # poll interval against the deadline
            slot = bridge.children()["pool"][0]
        assert slot["ready"] and slot["pid"] not in (None, leader)
        assert _state(grandchildren[0]) is None  # killed and reaped by the bridge (subreaper)


async def test_a_session_whose_server_cannot_restart_ends(tmp_path: Path, toy_argv: list[str]) -> None:
    """After the child exits and every restart fails, the session ends: its id answers 404."""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    with run_bridge(tmp_path, [*toy_argv, "--once"], "--pool", "0", "--workdir", str(tmp_path),
                    "--restart-backoff", "0.05") as bridge:
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url, json=INIT, headers=headers) as init:
                headers["Mcp-Session-Id"] = init.headers["Mcp-Session-Id"]
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "exit"}}
            async with http.post(bridge.url, json=call, headers=headers) as crashed:
                assert (await crashed.json())["error"]["data"]["reason"] == "upstream_exited"
            deadline = time.monotonic() + WAIT
            while bridge.children()["sessions"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll interval against the deadline
            assert bridge.children()["sessions"] == {}
            async with http.post(bridge.url, json={**call, "id": 3}, headers=headers) as gone:
                assert gone.status == 404


async def test_an_idle_session_stops_its_child(tmp_path: Path, toy_argv: list[str]) -> None:
    """Past --session-idle-seconds without a request, the session ends and its child is stopped."""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    with run_bridge(tmp_path, toy_argv, "--pool", "0", "--session-idle-seconds", "0.5") as bridge:
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url, json=INIT, headers=headers) as init:
                assert init.status == 200
            pid = await _session_child(bridge)
            deadline = time.monotonic() + WAIT
            while bridge.children()["sessions"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll interval against the deadline
            assert bridge.children()["sessions"] == {}
            while _state(pid) is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert _state(pid) is None


async def test_a_stateless_client_going_away_cancels(tmp_path: Path, toy_argv: list[str]) -> None:
    """A 2026-07-28 client that closes its connection cancels the request at the child."""
    with run_bridge(tmp_path, toy_argv, "--pool", "1") as bridge:
        async with aiohttp.ClientSession() as http:
            body, headers = _modern("tools/call", {"name": "hang", "arguments": {}}, "hang")
            with pytest.raises(TimeoutError):
                async with http.post(bridge.url, json=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=0.5)):
                    pass
            deadline = time.monotonic() + WAIT
            seen: dict[str, list[Any]] = {"hung": [], "cancelled": []}
            body, headers = _modern("tools/call", {"name": "seen", "arguments": {}}, "seen")
            while time.monotonic() < deadline and not seen["cancelled"]:
                async with http.post(bridge.url, json=body, headers=headers) as answer:
                    seen = json.loads((await answer.json())["result"]["content"][0]["text"])
        assert seen["hung"] and seen["cancelled"] == seen["hung"]
        assert bridge.children()["pool"][0]["in_flight"] == 0
