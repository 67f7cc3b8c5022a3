"""Servers this project did not write, behind the real Envoy as `url` servers: an MCP server
written with the official Python SDK, once over plain HTTP at a path of its own (/v1/mcp) and
once over HTTPS requiring the gateway's client certificate. The official SDK client lists and
calls their tools through the gateway; the policy, list filtering, PII masking, progress over SSE
and the catalog apply as to the gateway's own servers; a dead upstream stops `up` with its name.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import trustme
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.catalog import Catalog
from gateway.config import load_config
from gatewayctl import cli, devstack
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
from tests.ports import free_port

T = TypeVar("T")
START_SECONDS = 20.0


@dataclass
class Upstreams:
    stack: devstack.Stack
    plain_port: int
    config_path: Path
    procs: list[subprocess.Popen[bytes]]

    def call_add(self) -> httpx2.Response:
        """One stateless tools/call of ``add`` on the plain server, as an admin."""
        return asyncio.run(stateless_call(self.stack, "sdk", bearer(self.stack.config, "admin"),
                                          "add", {"a": 1, "b": 1}))


def _policy(target: Path) -> Path:
    """The example policy with grants for the two SDK servers: admins everything, analysts the
    demo tools (with the IBAN masked, as for every analyst), viewers only ``add``."""
    target.mkdir()
    for rego in (REPO / "policies").glob("*.rego"):
        if not rego.name.endswith("_test.rego"):
            shutil.copy(rego, target / rego.name)
    data = json.loads((REPO / "policies" / "data.json").read_text(encoding="utf-8"))
    gw = data["gateway"]
    for server in ("sdk", "sdk_tls"):
        gw["servers"][server] = {"tenants": ["*"]}
        gw["roles"]["admin"]["tools"][server] = ["*"]
        gw["roles"]["analyst"]["tools"][server] = ["add", "lookup_customer", "slow", "whoami"]
        gw["roles"]["viewer"]["tools"][server] = ["add"]
    (target / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def _pinned(stack: devstack.Stack, server: str) -> bool:
    with Catalog(stack.config.catalog.path) as catalog:
        return catalog.get(server, "add") is not None


def _start(port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.fixtures.servers.sdk_http_server",
                             "--port", str(port), *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    if not installed("ext_authz.__main__"):
        pytest.skip("needs ext_authz")
    tmp = tmp_path_factory.mktemp("url-servers")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(tmp / "up.pem")
    leaf.private_key_pem.write_to_path(tmp / "up.key")
    client = ca.issue_cert("mcp-gateway")
    client.cert_chain_pems[0].write_to_path(tmp / "gw.pem")
    client.private_key_pem.write_to_path(tmp / "gw.key")
    plain_port, tls_port = free_port(), free_port()
    procs = [_start(plain_port, "--path", "/v1/mcp"),
             _start(tls_port, "--tls-cert", str(tmp / "up.pem"), "--tls-key", str(tmp / "up.key"),
                    "--client-ca", str(tmp / "ca.pem"))]
    servers: dict[str, dict[str, Any]] = {
        "sdk": {"url": f"http://127.0.0.1:{plain_port}/v1/mcp"},
        "sdk_tls": {"url": f"https://127.0.0.1:{tls_port}/mcp",
                    "tls": {"ca_file": str(tmp / "ca.pem"), "client_cert_file": str(tmp / "gw.pem"),
                            "client_key_file": str(tmp / "gw.key")}},
    }
    extra = {"policy": {"engine": "embedded", "dir": str(_policy(tmp / "policies"))}}
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                        authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["catalog"] = {**raw["catalog"], "mode": "tofu", "refresh_seconds": 1.0}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(REPO))
            # `up` waits until both answer the MCP handshake (they are still starting here).
            with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                                  startup_timeout=START_SECONDS) as stack:
                # ext_authz's first catalog fetch may have come before the servers were up; its
                # retry pins them (an unpinned tool is never listed).
                wait_until(lambda: _pinned(stack, "sdk") and _pinned(stack, "sdk_tls"),
                           "the catalog to pin both SDK servers' tools")
                yield Upstreams(stack, plain_port, path, procs)
    finally:
        for proc in procs:
            _stop(proc)


async def _session(stack: devstack.Stack, server: str, role: str,
                   work: Callable[[ClientSession], Awaitable[T]],
                   headers: dict[str, str] | None = None) -> T:
    token = bearer(stack.config, role)
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20,
                                  headers={"authorization": f"Bearer {token}", **(headers or {})}
                                  ) as http, \
            streamable_http_client(stack.config.resource_url(server), http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        return await work(client)


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("server", ["sdk", "sdk_tls"])
async def test_sdk_client_lists_and_calls_through_the_gateway(upstreams: Upstreams,
                                                              server: str) -> None:
    """An admin sees every tool of the SDK server and calls one, over HTTP and over mTLS."""
    async def work(client: ClientSession) -> tuple[set[str], str]:
        names = {t.name for t in (await client.list_tools()).tools}
        return names, _text(await client.call_tool("add", {"a": 2, "b": 3}))
    names, text = await _session(upstreams.stack, server, "admin", work)
    assert names == {"add", "lookup_customer", "slow", "whoami"}
    assert text == "5"


async def test_policy_lists_and_refuses_per_role(upstreams: Upstreams) -> None:
    """A viewer sees only ``add``; calling ``whoami`` is refused by the gateway."""
    async def work(client: ClientSession) -> set[str]:
        names = {t.name for t in (await client.list_tools()).tools}
        with pytest.raises(MCPError):
            await client.call_tool("whoami", {})
        return names
    assert await _session(upstreams.stack, "sdk", "viewer", work) == {"add"}


async def test_pii_is_masked_for_a_masked_role(upstreams: Upstreams) -> None:
    """An analyst's answer has the IBAN masked (the role's obligation); an admin's does not."""
    async def call(client: ClientSession) -> str:
        return _text(await client.call_tool("lookup_customer", {"customer_id": 7}))
    if HAS_EXT_PROC:
        masked = await _session(upstreams.stack, "sdk", "analyst", call)
        assert "DE89 3704 0044 0532 0130 00" not in masked and "customer 7" in masked
    clear = await _session(upstreams.stack, "sdk", "admin", call)
    assert "DE89 3704 0044 0532 0130 00" in clear


async def test_progress_arrives_over_sse(upstreams: Upstreams) -> None:
    """Progress notifications of the SDK server reach the client through Envoy."""
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def work(client: ClientSession) -> str:
        return _text(await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress))
    assert await _session(upstreams.stack, "sdk_tls", "admin", work) == "counted to 3"
    assert seen == [1, 2, 3]


async def test_upstream_sees_the_gateway_not_the_client(upstreams: Upstreams) -> None:
    """The upstream gets its own Host, no client token and no Origin, and the client's trace."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async def work(client: ClientSession) -> dict[str, str]:
        result = await client.call_tool("whoami", {})
        data: dict[str, str] = json.loads(_text(result))
        return data
    headers = await _session(upstreams.stack, "sdk", "admin", work, headers={
        "origin": "https://evil.example", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert headers["host"] == f"127.0.0.1:{upstreams.plain_port}"
    assert "authorization" not in headers and "origin" not in headers
    assert headers["x-mcp-user"] == "alice"
    assert headers["traceparent"].split("-")[1] == trace_id


def test_status_names_url_servers(upstreams: Upstreams) -> None:
    """``status`` has one healthy row per url endpoint, its URL as address and no process."""
    rows = [r for r in devstack.status(upstreams.stack.config) if r["component"].startswith("sdk")]
    assert sorted((r["component"], r["address"].split(":")[0], r["pid"], r["healthy"])
                  for r in rows) == [("sdk", "http", None, True), ("sdk_tls", "https", None, True)]


def test_a_dead_upstream_stops_up_naming_it(tmp_path: Path) -> None:
    """A url server that never answers fails start-up with the server's key, its URL and what
    the check got; nothing is left running."""
    port = free_port()
    path = stack_config(tmp_path, servers={"dead": {"url": f"http://127.0.0.1:{port}/mcp"}},
                        ext_authz=1, authz_transport=authz_transport())
    # Long enough for ext_authz to start on a busy machine; the dead server uses it all up.
    stack = devstack.Stack(load_config(path), ext_proc=False, startup_timeout=8.0)
    with pytest.raises(devstack.StackError) as err:
        stack.start(detach=False)
    message = str(err.value)
    assert f"servers.dead (http://127.0.0.1:{port}/mcp) was not healthy" in message
    assert "handshake check" in message
    wait_until(lambda: all(p.poll() is not None for p in stack.procs.values()), "the stack to stop")



def test_changed_definition_is_quarantined_until_approved(upstreams: Upstreams) -> None:
    """The SDK server restarts with another description of ``add``: the gateway's refresh
    quarantines it (calls refused at the gateway) until ``catalog approve sdk/add``."""
    assert upstreams.call_add().status_code == 200
    _stop(upstreams.procs[0])
    upstreams.procs[0] = _start(upstreams.plain_port, "--path", "/v1/mcp", "--variant", "2")
    wait_until(lambda: _refused(upstreams), "ext_authz to quarantine sdk/add", timeout=30.0)
    error = upstreams.call_add().json()["error"]
    assert error["data"]["reason"] == "tool_quarantined"
    assert cli.main(["--config", str(upstreams.config_path), "catalog", "approve", "sdk/add"]) == 0
    # Envoy's health check may still count the restarted instance down (503): wait for it.
    wait_until(lambda: upstreams.call_add().status_code != 503, "Envoy to see sdk healthy")
    reply = upstreams.call_add()
    assert reply.status_code == 200, reply.text


def _refused(upstreams: Upstreams) -> bool:
    try:
        return upstreams.call_add().status_code == 403
    except httpx2.TransportError:
        return False  # the restarted server is not listening yet


def test_catalog_refresh_reaches_url_servers(upstreams: Upstreams) -> None:
    """``mcp-gateway catalog refresh`` fetches from the upstream's URL with its TLS settings."""
    argv = ["--config", str(upstreams.config_path), "catalog", "refresh", "--server", "sdk_tls"]
    assert cli.main(argv) == 0



def test_mcp_inspector_lists_and_calls_through_the_gateway(upstreams: Upstreams,
                                                           tmp_path: Path) -> None:
    """The MCP Inspector CLI, a client this project did not write, lists the SDK server's tools
    and calls one over mTLS upstream through the gateway."""
    listed = inspector_cli(upstreams.stack, "sdk_tls", "admin", tmp_path, "--method", "tools/list")
    assert {t["name"] for t in listed["tools"]} == {"add", "lookup_customer", "slow", "whoami"}
    called = inspector_cli(upstreams.stack, "sdk_tls", "admin", tmp_path, "--method", "tools/call",
                           "--tool-name", "add", "--tool-arg", "a=20", "b=22")
    assert called["content"][0]["text"] == "42"
