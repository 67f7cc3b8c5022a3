"""Stdio servers this project did not write, behind the real Envoy as `command` servers: the
official `mcp-server-time` and `mcp-server-git` from PyPI (pip runtimes) and
`@modelcontextprotocol/server-everything` from npm (an npm runtime), each installed apart from the
gateway's venv and run behind the bridge (mcp_bridge). The official SDK client lists and calls
their tools through the gateway; the policy, list filtering, PII masking, progress over SSE and
the catalog apply as to the gateway's own servers; a stdio child killed mid-call costs that call
only. mcp-server-git serves a repository made here, whose author's email is the PII.

The runtimes come from the shared cache (.tools/runtimes-cache), so a checkout installs each
spec once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.catalog import Catalog
from gateway.config import load_config
from gatewayctl import cli, devstack, runtimes
from tests.e2e.conftest import HAS_EXT_PROC, installed
from tests.e2e.helpers import (
    REPO,
    authz_transport,
    bearer,
    inspector_cli,
    stack_config,
    stateless_call,
    tls_context,
    wait_until,
)

T = TypeVar("T")
START_SECONDS = 30.0
SHARED_CACHE = REPO / ".tools" / "runtimes-cache"
IBAN = "DE89 3704 0044 0532 0130 00"
TIME_TOOLS = {"get_current_time", "convert_time"}
# The analyst's share of server-everything (not get-env, which shows the child's environment).
ANALYST_EVERYTHING = ["echo", "get-sum", "trigger-long-running-operation"]
# mcp-server-git's read-only tools, the analyst's share (not git_add, git_commit, git_reset,
# git_create_branch, git_checkout, which change the repository).
GIT_READ_ONLY = ["git_branch", "git_diff", "git_diff_staged", "git_diff_unstaged", "git_log",
                 "git_show", "git_status"]
AUTHOR = "Jane Roe"
AUTHOR_EMAIL = "jane.roe@example.com"


@dataclass
class Stdio:
    stack: devstack.Stack
    config_path: Path
    repo: Path

    def call_time(self, role: str = "admin") -> httpx2.Response:
        """One stateless tools/call of get_current_time."""
        return asyncio.run(stateless_call(self.stack, "time", bearer(self.stack.config, role),
                                          "get_current_time", {"timezone": "UTC"}))

    def bridge(self, name: str) -> devstack.Component:
        (comp,) = [c for c in self.stack.components if c.name == name]
        return comp


def _policy(target: Path) -> Path:
    """The example policy with grants for the three stdio servers: admins everything, analysts
    time's tools, part of server-everything (their IBANs masked, as for every analyst) and git's
    read-only tools (emails masked there too, a per-server ``mask_pii``), viewers only
    get_current_time."""
    target.mkdir()
    for rego in (REPO / "policies").glob("*.rego"):
        if not rego.name.endswith("_test.rego"):
            (target / rego.name).write_bytes(rego.read_bytes())
    data = json.loads((REPO / "policies" / "data.json").read_text(encoding="utf-8"))
    gw = data["gateway"]
    for server in ("time", "everything", "git"):
        gw["servers"][server] = {"tenants": ["*"]}
        gw["roles"]["admin"]["tools"][server] = ["*"]
    gw["servers"]["git"]["mask_pii"] = {"analyst": ["email", *gw["roles"]["analyst"]["mask_pii"]]}
    gw["roles"]["analyst"]["tools"]["time"] = sorted(TIME_TOOLS)
    gw["roles"]["analyst"]["tools"]["everything"] = ANALYST_EVERYTHING
    gw["roles"]["analyst"]["tools"]["git"] = GIT_READ_ONLY
    gw["roles"]["viewer"]["tools"]["time"] = ["get_current_time"]
    (target / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def _git(repo: Path, *args: str) -> str:
    """git in ``repo`` with a fixed environment: no system or user config, one author."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(repo.parent),
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C",
           "GIT_AUTHOR_NAME": AUTHOR, "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
           "GIT_COMMITTER_NAME": AUTHOR, "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True, timeout=30).stdout


def _repository(repo: Path) -> Path:
    """A repository of two commits by one author; the second's message names her email too
    (git_log prints the author's name only, git_show name and email)."""
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README").write_text("one\n", encoding="utf-8")
    _git(repo, "add", "README")
    _git(repo, "commit", "-q", "-m", "First commit")
    (repo / "README").write_text("one\ntwo\n", encoding="utf-8")
    _git(repo, "commit", "-q", "-a", "-m",
         f"Second commit\n\nSigned-off-by: {AUTHOR} <{AUTHOR_EMAIL}>")
    return repo


def _pinned(stack: devstack.Stack, server: str, tool: str) -> bool:
    with Catalog(stack.config.catalog.path) as catalog:
        return catalog.get(server, tool) is not None


@pytest.fixture(scope="module")
def stdio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stdio]:
    if not installed("ext_authz.__main__"):
        pytest.skip("needs ext_authz")
    tmp = tmp_path_factory.mktemp("command-servers")
    repo = _repository(tmp / "repo")
    servers: dict[str, dict[str, Any]] = {
        "time": {"command": ["mcp-server-time", "--local-timezone", "UTC"],
                 "runtime": {"pip": ["mcp-server-time==2026.10.19"]}, "count": 1},
        "everything": {"command": ["mcp-server-everything"],
                       "runtime": {"npm": ["@modelcontextprotocol/server-everything@2026.8.31"]},
                       "count": 1},
        "git": {"command": ["mcp-server-git", "--repository", str(repo)],
                "runtime": {"pip": ["mcp-server-git==2026.10.19"]}, "count": 1},
    }
    extra = {"policy": {"engine": "embedded", "dir": str(_policy(tmp / "policies"))}}
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                        authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["catalog"] = {**raw["catalog"], "mode": "tofu", "refresh_seconds": 1.0}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        mp.setenv(runtimes.CACHE_ENV, str(SHARED_CACHE))
        # `up` installs (or reuses) the runtimes, then starts one bridge per server.
        with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                              startup_timeout=START_SECONDS) as stack:
            # ext_authz's first catalog fetch may come before the children answer; its retry
            # pins them (an unpinned tool is never listed).
            wait_until(lambda: _pinned(stack, "time", "get_current_time")
                       and _pinned(stack, "everything", "echo")
                       and _pinned(stack, "git", "git_log"),
                       "the catalog to pin the stdio servers' tools")
            yield Stdio(stack, path, repo)


async def _session(stack: devstack.Stack, server: str, role: str,
                   work: Callable[[ClientSession], Awaitable[T]],
                   session_ids: list[str] | None = None) -> T:
    """``work`` on an initialized SDK client session; ``session_ids`` collects the MCP session
    ids the gateway answered with."""
    token = bearer(stack.config, role)

    async def remember(response: httpx2.Response) -> None:
        if session_ids is not None and "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20,
                                  headers={"authorization": f"Bearer {token}"},
                                  event_hooks={"response": [remember]}) as http, \
            streamable_http_client(stack.config.resource_url(server), http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        return await work(client)


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def _names(client: ClientSession) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


async def test_sdk_client_lists_and_calls_the_servers(stdio: Stdio) -> None:
    """An admin sees the servers' tools (installed from PyPI and npm), all of git's too, and
    calls them."""
    async def on_time(client: ClientSession) -> tuple[set[str], dict[str, Any]]:
        result = await client.call_tool("get_current_time", {"timezone": "Europe/Berlin"})
        return await _names(client), json.loads(_text(result))

    async def on_everything(client: ClientSession) -> tuple[set[str], str]:
        return await _names(client), _text(await client.call_tool("get-sum", {"a": 2, "b": 3}))

    async def on_git(client: ClientSession) -> tuple[set[str], str]:
        return await _names(client), _text(await client.call_tool(
            "git_status", {"repo_path": str(stdio.repo)}))

    names, now = await _session(stdio.stack, "time", "admin", on_time)
    assert names == TIME_TOOLS and now["timezone"] == "Europe/Berlin"
    names, total = await _session(stdio.stack, "everything", "admin", on_everything)
    assert {"echo", "get-env", "get-sum", "trigger-long-running-operation"} <= names
    assert "5" in total
    names, status = await _session(stdio.stack, "git", "admin", on_git)
    assert names == {*GIT_READ_ONLY, "git_add", "git_commit", "git_reset", "git_create_branch",
                     "git_checkout"}
    assert "On branch main" in status


async def test_policy_lists_and_refuses_per_role(stdio: Stdio) -> None:
    """An analyst sees only its share of server-everything and is refused get-env; a viewer sees
    only get_current_time and is refused convert_time."""
    async def analyst(client: ClientSession) -> set[str]:
        names = await _names(client)
        with pytest.raises(MCPError):
            await client.call_tool("get-env", {})
        return names

    async def viewer(client: ClientSession) -> set[str]:
        names = await _names(client)
        with pytest.raises(MCPError):
            await client.call_tool("convert_time", {"source_timezone": "UTC", "time": "12:00",
                                                    "target_timezone": "Asia/Tokyo"})
        return names
    assert await _session(stdio.stack, "everything", "analyst", analyst) == set(ANALYST_EVERYTHING)
    assert await _session(stdio.stack, "time", "viewer", viewer) == {"get_current_time"}


async def test_pii_is_masked_for_a_masked_role(stdio: Stdio) -> None:
    """server-everything's echo of an IBAN reaches an analyst masked, an admin in clear."""
    async def echo(client: ClientSession) -> str:
        return _text(await client.call_tool("echo", {"message": f"pay to {IBAN} today"}))
    if HAS_EXT_PROC:
        masked = await _session(stdio.stack, "everything", "analyst", echo)
        assert IBAN not in masked and "pay to" in masked and "today" in masked
    assert IBAN in await _session(stdio.stack, "everything", "admin", echo)


async def test_git_author_email_is_masked_for_an_analyst(stdio: Stdio) -> None:
    """mcp-server-git's log and show of the repository name its author's email: an analyst (git
    masks emails for analysts) reads them masked, an admin in clear."""
    async def history(client: ClientSession) -> list[str]:
        log = await client.call_tool("git_log", {"repo_path": str(stdio.repo)})
        show = await client.call_tool("git_show", {"repo_path": str(stdio.repo),
                                                   "revision": "HEAD"})
        assert not log.is_error and not show.is_error, (log, show)
        return [_text(log), _text(show)]
    if HAS_EXT_PROC:
        for masked in await _session(stdio.stack, "git", "analyst", history):
            assert AUTHOR_EMAIL not in masked and AUTHOR in masked, masked
            assert "Second commit" in masked
    for clear in await _session(stdio.stack, "git", "admin", history):
        assert f"{AUTHOR} <{AUTHOR_EMAIL}>" in clear, clear


async def test_git_writes_are_refused_to_an_analyst(stdio: Stdio) -> None:
    """An analyst sees only git's read-only tools; its git_commit is refused at the gateway
    and the repository keeps its two commits."""
    async def analyst(client: ClientSession) -> set[str]:
        names = await _names(client)
        with pytest.raises(MCPError):
            await client.call_tool("git_commit", {"repo_path": str(stdio.repo),
                                                  "message": "not by an analyst"})
        return names
    assert await _session(stdio.stack, "git", "analyst", analyst) == set(GIT_READ_ONLY)
    assert _git(stdio.repo, "rev-list", "--count", "HEAD").strip() == "2"


async def test_progress_arrives_over_sse(stdio: Stdio) -> None:
    """server-everything's progress notifications reach the client through bridge and Envoy."""
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def work(client: ClientSession) -> str:
        return _text(await client.call_tool("trigger-long-running-operation",
                                            {"duration": 0.6, "steps": 3},
                                            progress_callback=on_progress))
    assert "completed" in await _session(stdio.stack, "everything", "analyst", work)
    assert seen == [1, 2, 3]


def _children(comp: devstack.Component) -> dict[str, Any]:
    """The bridge's loopback view of its children: each session's and pool slot's pid."""
    url = f"http://{comp.host}:{comp.port}/-/children"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  (loopback bridge)
        data: dict[str, Any] = json.loads(reply.read())
    return data


def _bridge_session_id(client_id: str) -> str:
    """The bridge's own session id inside the one the client holds: Envoy's stateful session
    envelope is ``base64(instance);UV:base64(upstream's id)``."""
    _, sep, upstream = client_id.partition(";UV:")
    return base64.b64decode(upstream).decode() if sep else client_id


def _session_child(comp: devstack.Component, client_id: str) -> dict[str, Any]:
    """The bridge's record of the child serving one MCP session (keyed by the id's start)."""
    children = _children(comp)
    key = _bridge_session_id(client_id)[:8]
    assert key in children["sessions"], (client_id, children)
    link: dict[str, Any] = children["sessions"][key]
    return link


async def test_a_child_killed_mid_call_fails_that_call_only(stdio: Stdio) -> None:
    """SIGKILL of the stdio child during a long call: the client gets a JSON-RPC error, and its
    next call succeeds (the bridge restarts the child)."""
    bridge = stdio.bridge("everything")
    started = asyncio.Event()
    session_ids: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async def work(client: ClientSession) -> str:
        call = asyncio.create_task(client.call_tool(
            "trigger-long-running-operation", {"duration": 20, "steps": 40},
            progress_callback=on_progress))
        await asyncio.wait_for(started.wait(), 10)
        # This session's child (the catalog's fetches have sessions of their own).
        child = await asyncio.to_thread(_session_child, bridge, session_ids[-1])
        assert child["in_flight"] == 1 and child["pid"] is not None, child
        os.kill(child["pid"], signal.SIGKILL)
        with pytest.raises(MCPError):
            await asyncio.wait_for(call, 15)
        return _text(await client.call_tool("echo", {"message": "still here"}))
    assert "still here" in await _session(stdio.stack, "everything", "admin", work, session_ids)


def test_status_lists_the_bridges(stdio: Stdio) -> None:
    """``status`` has one live, healthy row per bridge, with its loopback address and pid."""
    rows = {r["component"]: r for r in devstack.status(stdio.stack.config)
            if r["component"] in ("time", "everything", "git")}
    for name in ("time", "everything", "git"):
        comp = stdio.bridge(name)
        row = rows[name]
        assert (row["address"], row["alive"], row["healthy"]) == (comp.address, True, True)
        assert row["pid"] == stdio.stack.procs[comp.label].pid


def _restart_bridge(stdio: Stdio, name: str, argv: tuple[str, ...]) -> None:
    """Stop ``name``'s bridge and start it again with another argv (same port, PATH and log)."""
    stack = stdio.stack
    comp = stdio.bridge(name)
    old = stack.procs[comp.label]
    os.killpg(old.pid, signal.SIGTERM)
    old.wait(20)
    new = replace(comp, argv=argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": os.pathsep.join([*new.path_prefix, os.environ.get("PATH", os.defpath)])}
    log = devstack.paths(stack.config).logs / f"{comp.name}-{comp.instance}.log"
    with open(log, "ab") as out:
        stack.procs[comp.label] = subprocess.Popen(
            new.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=devstack.base_dir(stack.config), env=env, start_new_session=True)
    wait_until(lambda: devstack.probe(new, stack.config, stack.ca_file), f"{name}'s bridge to start")


def _refused(stdio: Stdio) -> bool:
    reply = stdio.call_time()
    return reply.status_code == 403


def test_changed_definition_is_quarantined_until_approved(stdio: Stdio) -> None:
    """mcp-server-time names its local timezone in its tools' argument descriptions: restarted
    with another one, its tools are quarantined by the catalog's refresh (calls refused at the
    gateway) until ``catalog approve``."""
    assert stdio.call_time().status_code == 200
    argv = stdio.bridge("time").argv
    assert argv[-2:] == ("--local-timezone", "UTC")
    _restart_bridge(stdio, "time", (*argv[:-1], "Europe/Paris"))
    wait_until(lambda: _refused(stdio), "ext_authz to quarantine time/get_current_time",
               timeout=30.0)
    assert stdio.call_time().json()["error"]["data"]["reason"] == "tool_quarantined"
    for tool in sorted(TIME_TOOLS):
        assert cli.main(["--config", str(stdio.config_path), "catalog", "approve",
                         f"time/{tool}"]) == 0
    # Envoy's health check may still count the restarted bridge down (503): wait for it.
    wait_until(lambda: stdio.call_time().status_code != 503, "Envoy to see time healthy")
    reply = stdio.call_time()
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(("server", "tool", "args", "expect"), [
    ("time", "get_current_time", ("timezone=UTC",), '"timezone": "UTC"'),
    ("everything", "echo", ("message=hello",), "hello"),
])
def test_mcp_inspector_lists_and_calls_through_the_gateway(
        stdio: Stdio, tmp_path: Path, server: str, tool: str, args: tuple[str, ...],
        expect: str) -> None:
    """The MCP Inspector CLI, a client this project did not write, lists and calls each stdio
    server through the gateway and the bridge."""
    listed = inspector_cli(stdio.stack, server, "admin", tmp_path, "--method", "tools/list")
    assert tool in {t["name"] for t in listed["tools"]}
    called = inspector_cli(stdio.stack, server, "admin", tmp_path, "--method", "tools/call",
                           "--tool-name", tool, "--tool-arg", *args)
    assert expect in called["content"][0]["text"]
