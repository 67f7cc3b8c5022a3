"""The aggregate endpoint /mcp and a virtual server through the real stack: Envoy, ext_authz,
ext_proc, the aggregator, the files and database servers and `mcp-server-time` from PyPI behind
the stdio bridge, driven by the official `mcp` SDK client.

/mcp lists the tools of every server a caller may use as <server>__<tool> and calls them through
Envoy's fast path; the policy's denials, the per-caller list filtering and the masking hold as on
/mcp/<server>; a session id that was altered does not exist; a virtual server shows and serves
only its selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.config import Instance, load_config
from gatewayctl import devstack, runtimes
from gatewayctl.envoy_config import RenderOptions, find_envoy, render
from tests.e2e.conftest import HAS_EXT_PROC, installed
from tests.e2e.helpers import (
    INSPECTOR,
    MODERN,
    MODERN_META,
    NODE,
    REPO,
    authz_transport,
    bearer,
    envoy_stat,
    stack_config,
    tls_context,
    wait_until,
)
from tests.ports import free_ports

T = TypeVar("T")
START_SECONDS = 60.0
SHARED_CACHE = REPO / ".tools" / "runtimes-cache"
IBAN = "DE89 3704 0044 0532 0130 00"  # analysts get IBANs masked (policies/data.json)
CONTACT = f"Pay Jane Roe to {IBAN}\n"
KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"
VIRTUAL = "readonly"
DISABLED = "describe_table"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Stack]:
    missing = [m for m in ("ext_authz.__main__", "mcp_aggregator.__main__",
                           "mcp_servers.files.__main__", "mcp_servers.database.__main__",
                           "mcp_servers.conformance.__main__")
               if not installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("aggregate")
    root = tmp / "files-root"
    (root / "shared").mkdir(parents=True)
    (root / "shared" / "contact.txt").write_text(CONTACT, encoding="utf-8")
    policies = tmp / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("*_test.rego"))
    # One organisation rule (policies/org.rego) switches a tool off for everyone: it must hold
    # on /mcp as on /mcp/database.
    org = policies / "org.rego"
    org.write_text(org.read_text(encoding="utf-8").replace(
        "disabled_tools := {}", f'disabled_tools := {{"database": ["{DISABLED}"]}}'), encoding="utf-8")
    servers: dict[str, dict[str, Any]] = {
        "files": {"module": "mcp_servers.files", "args": ["--root", str(root), "--allow-write"],
                  "count": 1},
        "database": {"module": "mcp_servers.database", "args": ["--seed-demo"], "count": 1},
        "time": {"command": ["mcp-server-time", "--local-timezone", "UTC"],
                 "runtime": {"pip": ["mcp-server-time==2026.10.19"]}, "count": 1},
        "conformance": {"module": "mcp_servers.conformance", "count": 1},
    }
    aggregator, inner = free_ports(2)
    extra = {
        "policy": {"engine": "embedded", "dir": str(policies)},
        "secrets": [KEYS],
        "aggregate": {"instances": [{"port": aggregator}], "inner_listener": {"port": inner},
                      "session_keys": KEYS},
        # The servers, the stdio bridge and the aggregator take the caller from the gateway's
        # signed assertion only (docs/identity.md): every path below runs with it.
        "identity": {"assertion": True},
        "virtual_servers": {VIRTUAL: {"tools": ["files/read_*", "time/get_current_time"],
                                      "description": "Read files, tell the time"}},
    }
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                        authz_transport=authz_transport())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        mp.setenv(runtimes.CACHE_ENV, str(SHARED_CACHE))
        with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                              startup_timeout=START_SECONDS) as running:
            wait_until(lambda: _catalog_pinned(running), "the catalog to pin every server's tools")
            yield running


def _catalog_pinned(stack: devstack.Stack) -> bool:
    from gateway.catalog import Catalog

    with Catalog(stack.config.catalog.path) as catalog:
        return all(catalog.get(server, tool) is not None for server, tool in
                   (("files", "read_file"), ("files", "write_file"), ("database", "list_tables"),
                    ("time", "get_current_time"), ("conformance", "test_elicitation")))


def _url(stack: devstack.Stack, virtual: str | None = None) -> str:
    return stack.config.aggregate_url(virtual)


async def _session(stack: devstack.Stack, role: str, work: Callable[[ClientSession], Awaitable[T]],
                   *, virtual: str | None = None, session_ids: list[str] | None = None,
                   elicitation: Any = None) -> T:
    """``work`` on an initialized SDK client session on /mcp (or /mcp/<virtual>)."""
    async def remember(response: httpx2.Response) -> None:
        if session_ids is not None and "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    token = bearer(stack.config, role)
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30,
                                  headers={"authorization": f"Bearer {token}"},
                                  event_hooks={"response": [remember]}) as http, \
            streamable_http_client(_url(stack, virtual), http_client=http) as (r, w), \
            ClientSession(r, w, elicitation_callback=elicitation) as client:
        await client.initialize()
        return await work(client)


async def _names(client: ClientSession) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_one_endpoint_lists_and_calls_every_server(stack: devstack.Stack) -> None:
    """An admin's /mcp lists the files, database and time servers' tools as <server>__<tool>
    and calls one of each (the time one through the stdio bridge)."""
    async def work(client: ClientSession) -> tuple[set[str], list[Any]]:
        names = await _names(client)
        results = [await client.call_tool("time__get_current_time", {"timezone": "UTC"}),
                   await client.call_tool("files__read_file", {"path": "shared/contact.txt"}),
                   await client.call_tool("database__list_tables", {})]
        return names, results

    names, (now, contact, tables) = await _session(stack, "admin", work)
    assert {"time__get_current_time", "time__convert_time", "files__read_file",
            "files__write_file", "database__list_tables"} <= names
    assert all("__" in name and name.split("__", 1)[0] in {"files", "database", "time", "conformance"}
               for name in names)
    assert not now.is_error and json.loads(_text(now))["timezone"] == "UTC"
    assert not contact.is_error and IBAN in _text(contact)  # admins see it unmasked
    assert not tables.is_error and "orders" in _text(tables)


async def test_denied_tool_is_neither_listed_nor_callable(stack: devstack.Stack) -> None:
    """An analyst may not write files: files__write_file is missing from /mcp's list and a call
    is refused, as write_file is on /mcp/files; the analyst's read goes through masked."""
    async def work(client: ClientSession) -> tuple[set[str], Any]:
        names = await _names(client)
        contact = await client.call_tool("files__read_file", {"path": "shared/contact.txt"})
        with pytest.raises(MCPError):
            await client.call_tool("files__write_file", {"path": "shared/x.txt", "content": "x"})
        return names, contact

    names, contact = await _session(stack, "analyst", work)
    assert "files__read_file" in names and "time__get_current_time" in names
    assert "files__write_file" not in names
    assert not contact.is_error
    assert IBAN not in _text(contact) and "[REDACTED:iban]" in _text(contact)
    assert not (stack.config.state_dir and (Path(stack.config.state_dir).parent / "files-root"
                                             / "shared" / "x.txt").exists())


async def test_altered_session_id_does_not_exist(stack: devstack.Stack) -> None:
    """A sealed session id with one character changed is unknown: 404, as for an ended one."""
    ids: list[str] = []
    await _session(stack, "admin", _names, session_ids=ids)
    assert ids, "the aggregate endpoint answered without a session id"
    sid = ids[0]
    forged = sid[:-2] + ("A" if sid[-2] != "A" else "B") + sid[-1]
    token = bearer(stack.config, "admin")
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30) as http:
        answer = await http.post(_url(stack), headers={
            "authorization": f"Bearer {token}", "mcp-session-id": forged,
            "mcp-protocol-version": "2025-11-25", "content-type": "application/json",
            "accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                  "params": {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}})
        listing = await http.post(_url(stack), headers={
            "authorization": f"Bearer {token}", "mcp-session-id": forged,
            "mcp-protocol-version": "2025-11-25", "content-type": "application/json",
            "accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert answer.status_code == 404 and listing.status_code == 404


async def test_virtual_server_serves_only_its_selection(stack: devstack.Stack) -> None:
    """/mcp/readonly lists the files read tools and get_current_time only; a tool outside it is
    refused even for an admin, one inside it is served."""
    async def work(client: ClientSession) -> tuple[set[str], Any]:
        names = await _names(client)
        with pytest.raises(MCPError):
            await client.call_tool("database__list_tables", {})
        return names, await client.call_tool("time__get_current_time", {"timezone": "UTC"})

    names, now = await _session(stack, "admin", work, virtual=VIRTUAL)
    assert names == {"files__read_file", "time__get_current_time"} | {
        n for n in names if n.startswith("files__read_")}
    assert "time__get_current_time" in names and "files__read_file" in names
    assert not now.is_error and json.loads(_text(now))["timezone"] == "UTC"


def test_status_reports_the_aggregator(stack: devstack.Stack) -> None:
    """The stack runs one aggregator and `status` sees it healthy."""
    wait_until(lambda: any(row["component"] == "aggregator" and row["healthy"]
                           for row in devstack.status(stack.config)), "the aggregator to be healthy")


async def test_a_rego_rule_denies_the_tool_on_both_paths(stack: devstack.Stack) -> None:
    """The organisation rule that disables database/describe_table hides and refuses it on /mcp
    and on /mcp/database alike, for an admin."""
    async def work(client: ClientSession) -> set[str]:
        names = await _names(client)
        with pytest.raises(MCPError):
            await client.call_tool(f"database__{DISABLED}", {"table": "orders"})
        return names

    names = await _session(stack, "admin", work)
    assert "database__list_tables" in names and f"database__{DISABLED}" not in names
    token = bearer(stack.config, "admin")
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30) as http:
        direct = await http.post(stack.config.resource_url("database"), headers={
            "authorization": f"Bearer {token}", "content-type": "application/json",
            "accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN,
            "mcp-method": "tools/call", "mcp-name": DISABLED},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                  "params": {"name": DISABLED, "arguments": {"table": "orders"},
                             "_meta": MODERN_META}})
    assert direct.status_code == 403 and "tool_disabled" in direct.text


async def test_protocol_versions(stack: devstack.Stack) -> None:
    """2025-06-18 and 2025-11-25 clients get their version back from initialize on /mcp; a
    2026-07-28 client discovers /mcp and calls a prefixed tool without a session."""
    token = bearer(stack.config, "admin")
    base = {"authorization": f"Bearer {token}", "content-type": "application/json",
            "accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30) as http:
        for version in ("2025-06-18", "2025-11-25"):
            answer = await http.post(_url(stack), headers=base, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": version, "capabilities": {},
                    "clientInfo": {"name": "e2e", "version": "1"}}})
            assert answer.status_code == 200, answer.text
            assert _result(answer)["protocolVersion"] == version
            assert answer.headers["mcp-session-id"]
        modern = {**base, "mcp-protocol-version": MODERN}
        discover = await http.post(_url(stack), headers={**modern, "mcp-method": "server/discover"},
                                   json={"jsonrpc": "2.0", "id": 2, "method": "server/discover",
                                         "params": {"_meta": MODERN_META}})
        assert discover.status_code == 200 and "tools" in _result(discover)["capabilities"]
        call = await http.post(_url(stack), headers={
            **modern, "mcp-method": "tools/call", "mcp-name": "time__get_current_time"},
            json={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
                "name": "time__get_current_time", "arguments": {"timezone": "UTC"},
                "_meta": MODERN_META}})
        assert call.status_code == 200, call.text
        assert json.loads(_result(call)["content"][0]["text"])["timezone"] == "UTC"


def _inspector(stack: devstack.Stack, role: str, home: Path, *args: str,
               virtual: str | None = None) -> subprocess.CompletedProcess[str]:
    """The MCP Inspector's CLI (``make tools``), a client this project did not write, on /mcp (or
    /mcp/<virtual>) with a token of ``role``; the finished process (``inspector_cli`` in helpers
    does the same for /mcp/<server>)."""
    if not (NODE.is_file() and INSPECTOR.exists()):
        raise AssertionError("the MCP Inspector is missing under .tools: run `make tools`")
    token = bearer(stack.config, role)
    env = {"PATH": f"{NODE.parent}:/usr/bin:/bin", "HOME": str(home),
           "MCP_CATALOG_PATH": str(home / "inspector-catalog.json"),
           "NODE_EXTRA_CA_CERTS": str(stack.ca_file)}
    return subprocess.run(
        [str(NODE), str(INSPECTOR), "--cli", _url(stack, virtual), "--transport", "http",
         "--header", f"Authorization: Bearer {token}", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def _inspected(proc: subprocess.CompletedProcess[str]) -> Any:
    """The Inspector's JSON output of a call that succeeded."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _unknown_to_inspector(proc: subprocess.CompletedProcess[str], tool: str) -> bool:
    """Whether the Inspector refused to call ``tool`` because the endpoint's list lacks it."""
    return proc.returncode != 0 and f"Tool '{tool}' not found" in proc.stderr


async def _sent_anyway(stack: devstack.Stack, role: str, tool: str, arguments: dict[str, Any],
                       virtual: str | None = None) -> httpx2.Response:
    """``tools/call`` of ``tool`` sent to /mcp (or /mcp/<virtual>) although it is not listed: one
    stateless 2026-07-28 request, as a client that skips the list would send it."""
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30) as http:
        return await http.post(_url(stack, virtual), headers={
            "authorization": f"Bearer {bearer(stack.config, role)}",
            "content-type": "application/json", "accept": "application/json, text/event-stream",
            "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": tool, "arguments": arguments, "_meta": MODERN_META}})


def _refused_by_gateway(answer: httpx2.Response) -> bool:
    """Whether the gateway refused a call: HTTP 403, or a JSON-RPC error instead of a result."""
    if answer.status_code == 403:
        return True
    text = answer.text
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        text = next((line[5:] for line in text.splitlines() if line.startswith("data:")), "{}")
    return "error" in json.loads(text) and "result" not in json.loads(text)


def _inspector_call(stack: devstack.Stack, role: str, home: Path, tool: str, *arguments: str,
                    virtual: str | None = None) -> subprocess.CompletedProcess[str]:
    return _inspector(stack, role, home, "--method", "tools/call", "--tool-name", tool,
                      *(("--tool-arg", *arguments) if arguments else ()), virtual=virtual)


async def test_mcp_inspector_lists_and_calls_every_server(stack: devstack.Stack,
                                                          tmp_path: Path) -> None:
    """The MCP Inspector CLI on /mcp as an analyst: it lists the files, database and time servers'
    tools (time is `mcp-server-time` from PyPI) and calls one of each; write_file, which analysts
    may not use, is neither listed nor callable (the Inspector does not find it, and the gateway
    refuses it to a client that sends it anyway)."""
    listed = _inspected(_inspector(stack, "analyst", tmp_path, "--method", "tools/list"))
    names = {t["name"] for t in listed["tools"]}
    assert {"files__read_file", "database__list_tables", "time__get_current_time"} <= names
    assert "files__write_file" not in names
    now = _inspected(_inspector_call(stack, "analyst", tmp_path, "time__get_current_time",
                                     "timezone=UTC"))
    assert not now.get("isError") and json.loads(now["content"][0]["text"])["timezone"] == "UTC"
    contact = _inspected(_inspector_call(stack, "analyst", tmp_path, "files__read_file",
                                         "path=shared/contact.txt"))
    text = contact["content"][0]["text"]
    assert not contact.get("isError") and "[REDACTED:iban]" in text and IBAN not in text
    tables = _inspected(_inspector_call(stack, "analyst", tmp_path, "database__list_tables"))
    assert not tables.get("isError") and "orders" in tables["content"][0]["text"]
    written = _inspector_call(stack, "analyst", tmp_path, "files__write_file",
                              "path=shared/inspector.txt", "content=x")
    assert _unknown_to_inspector(written, "files__write_file"), written.stdout + written.stderr
    sent = await _sent_anyway(stack, "analyst", "files__write_file",
                              {"path": "shared/inspector.txt", "content": "x"})
    assert _refused_by_gateway(sent), (sent.status_code, sent.text)
    read = _inspector_call(stack, "admin", tmp_path, "files__read_file", "path=shared/inspector.txt")
    assert read.returncode != 0 and "does not exist" in read.stdout, read.stdout  # nothing written


async def test_mcp_inspector_on_a_virtual_server(stack: devstack.Stack, tmp_path: Path) -> None:
    """The MCP Inspector CLI on /mcp/readonly as an analyst: it lists the curated selection only
    and calls both of its servers' tools; a tool of another server and the denied write_file are
    neither listed nor callable there (not for the Inspector, and not for a client that sends
    them anyway)."""
    listed = _inspected(_inspector(stack, "analyst", tmp_path, "--method", "tools/list",
                                   virtual=VIRTUAL))
    names = {t["name"] for t in listed["tools"]}
    assert "files__read_file" in names and "time__get_current_time" in names
    assert all(n == "time__get_current_time" or n.startswith("files__read_") for n in names), names
    now = _inspected(_inspector_call(stack, "analyst", tmp_path, "time__get_current_time",
                                     "timezone=UTC", virtual=VIRTUAL))
    assert not now.get("isError") and json.loads(now["content"][0]["text"])["timezone"] == "UTC"
    contact = _inspected(_inspector_call(stack, "analyst", tmp_path, "files__read_file",
                                         "path=shared/contact.txt", virtual=VIRTUAL))
    assert not contact.get("isError") and "[REDACTED:iban]" in contact["content"][0]["text"]
    for tool, arguments in (("database__list_tables", {}),
                            ("files__write_file", {"path": "shared/virtual.txt", "content": "x"})):
        called = _inspector_call(stack, "analyst", tmp_path, tool,
                                 *(f"{k}={v}" for k, v in arguments.items()), virtual=VIRTUAL)
        assert _unknown_to_inspector(called, tool), called.stdout + called.stderr
        sent = await _sent_anyway(stack, "analyst", tool, arguments, virtual=VIRTUAL)
        assert _refused_by_gateway(sent), (tool, sent.status_code, sent.text)


@contextlib.contextmanager
def _paused(stack: devstack.Stack, name: str) -> Iterator[None]:
    """Every process of server ``name`` stopped (SIGSTOP) for the block, then resumed; returns
    once Envoy sees them healthy again (cluster ``mcp_<name>``), so later tests find it whole."""
    procs = [p for label, p in stack.procs.items() if label.startswith(f"{name}[")]
    for proc in procs:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: envoy_stat(stack.config, f"cluster.mcp_{name}.membership_healthy")
                   == len(procs), f"Envoy to see {name} healthy again")


def _result(answer: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC result of a JSON or single-event SSE answer."""
    text = answer.text
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    message: dict[str, Any] = json.loads(text)
    assert "result" in message, message
    result: dict[str, Any] = message["result"]
    return result


async def test_a_down_server_is_left_out_and_named(stack: devstack.Stack) -> None:
    """With the database server unreachable, /mcp still lists the other servers' tools (and names
    the missing one), and a call to it gets a JSON-RPC error naming the server."""
    with _paused(stack, "database"):
        wait_until(lambda: envoy_stat(stack.config, "cluster.mcp_database.membership_healthy") == 0,
                   "Envoy to see the database server down")

        async def work(client: ClientSession) -> tuple[Any, MCPError]:
            listed = await client.list_tools()
            with pytest.raises(MCPError) as info:
                await client.call_tool("database__list_tables", {})
            return listed, info.value

        listed, error = await _session(stack, "admin", work)
        names = {t.name for t in listed.tools}
        assert "files__read_file" in names and "time__get_current_time" in names
        assert not {n for n in names if n.startswith("database__")}
        unavailable = (listed.meta or {}).get("io.mcp-gateway/unavailable", [])
        assert [u["server"] for u in unavailable] == ["database"]
        assert error.error.code == -32603 and "database" in error.error.message


async def test_elicitation_and_progress_through_the_fast_path(stack: devstack.Stack) -> None:
    """A call's SSE answer carries the conformance server's elicitation request (its id prefixed
    by Envoy's Lua filter) to the client, whose answer is routed back to that server; progress
    notifications arrive on the same stream."""
    asked: list[str] = []
    steps: list[float] = []

    async def elicitation(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"username": "ada", "email": "a@x.org"})

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append(progress)

    async def work(client: ClientSession) -> tuple[Any, Any]:
        elicited = await client.call_tool("conformance__test_elicitation", {"message": "Who?"})
        stepped = await client.call_tool("conformance__test_tool_with_progress", {},
                                         progress_callback=on_progress)
        return elicited, stepped

    elicited, stepped = await _session(stack, "admin", work, elicitation=elicitation)
    assert asked == ["Who?"]
    assert not elicited.is_error and "action=accept" in _text(elicited) and "ada" in _text(elicited)
    assert not stepped.is_error and steps == [0, 50, 100]


# ------------------------------------------- replicas: two Envoys, two ext_authz, two aggregators

@contextlib.contextmanager
def _redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    (port,) = free_ports(1)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)  # polling a readiness probe with a deadline
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _second_envoy(stack: devstack.Stack, folder: Path) -> Iterator[str]:
    """Another Envoy from the same gateway config on ports of its own (the same ext_authz,
    aggregators and servers behind it); yields its /mcp URL."""
    listen, admin, inner = free_ports(3)
    config = stack.config
    assert config.aggregate.inner_listener is not None
    other = dataclasses.replace(
        config, listen=Instance("127.0.0.1", listen), admin=Instance("127.0.0.1", admin),
        aggregate=dataclasses.replace(config.aggregate, inner_listener=Instance("127.0.0.1", inner)))
    path = folder / "envoy-b.yaml"
    path.write_text(render(other, RenderOptions(ext_proc=HAS_EXT_PROC)), encoding="utf-8")
    log = folder / "envoy-b.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(find_envoy()), "-c", str(path), "--base-id", str(listen),
                                 "--concurrency", "1", "--log-level", "warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"envoy B exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False
        wait_until(ready, "the second Envoy to be ready")
        yield f"https://127.0.0.1:{listen}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[devstack.Stack, str]]:
    """A stack with two ext_authz and two aggregators sharing Redis, and a second Envoy."""
    if not installed("mcp_aggregator.__main__"):
        pytest.skip("needs mcp_aggregator")
    tmp = tmp_path_factory.mktemp("aggregate-replicas")
    (tmp / "files-root" / "shared").mkdir(parents=True)
    (tmp / "files-root" / "shared" / "a.txt").write_text("replicated\n", encoding="utf-8")
    with _redis() as redis_url:
        agg = free_ports(3)
        extra = {
            "secrets": [KEYS],
            "rate_limits": {"backend": "redis", "redis_url": redis_url,
                            "per_user": {"rate_per_second": 1000, "burst": 1000}},
            "aggregate": {"instances": [{"port": agg[0]}, {"port": agg[1]}],
                          "inner_listener": {"port": agg[2]}, "session_keys": KEYS},
        }
        servers: dict[str, dict[str, Any]] = {"files": {
            "module": "mcp_servers.files", "args": ["--root", str(tmp / "files-root")]}}
        path = stack_config(tmp, servers=servers, ext_authz=2, extra=extra,
                            authz_transport=authz_transport())
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(REPO))
            with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                                  startup_timeout=START_SECONDS) as running, \
                    _second_envoy(running, tmp) as other:
                yield running, other


async def test_a_session_opened_on_one_replica_serves_on_another(
        replicas: tuple[devstack.Stack, str]) -> None:
    """initialize through Envoy A; list and call through Envoy B with that session id (any
    ext_authz and aggregator opens the sealed id); DELETE through A ends it on B too (404)."""
    stack, other = replicas
    token = bearer(stack.config, "admin")
    base = {"authorization": f"Bearer {token}", "content-type": "application/json",
            "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=30) as http:
        opened = await http.post(_url(stack), headers=base, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "e2e", "version": "1"}}})
        assert opened.status_code == 200, opened.text
        session = {**base, "mcp-session-id": opened.headers["mcp-session-id"]}
        await http.post(_url(stack), headers=session,
                        json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        names: set[str] = set()
        for rid in range(2, 6):  # several lists: both aggregators answer some
            listed = await http.post(other, headers=session,
                                     json={"jsonrpc": "2.0", "id": rid, "method": "tools/list"})
            assert listed.status_code == 200, listed.text
            names |= {t["name"] for t in _result(listed)["tools"]}
        assert "files__read_file" in names
        for rid in range(6, 10):  # both ext_authz instances and both files instances
            called = await http.post(other, headers=session, json={
                "jsonrpc": "2.0", "id": rid, "method": "tools/call",
                "params": {"name": "files__read_file", "arguments": {"path": "shared/a.txt"}}})
            assert called.status_code == 200, called.text
            assert "replicated" in _result(called)["content"][0]["text"]
        ended = await http.delete(_url(stack), headers=session)
        assert ended.status_code in (200, 202, 204), ended.text
        after = await http.post(other, headers=session, json={
            "jsonrpc": "2.0", "id": 10, "method": "tools/call",
            "params": {"name": "files__read_file", "arguments": {"path": "shared/a.txt"}}})
        assert after.status_code == 404
