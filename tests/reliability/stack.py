"""The real gateway stack for fault and bad-input tests, and the few ways these tests talk to it.

The stack is the dev stack (``gatewayctl.devstack``) on free loopback ports from a temp config, as
in ``tests/e2e``; on top of that it adds the counter test server (``counter_server.py``) with a
ledger of executed calls, a copy of the example policy whose data also grants the counter server,
and helpers to kill, restart and watch components (Envoy's own view via its admin API).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gateway.catalog import Catalog
from gateway.config import GatewayConfig, load_config
from gatewayctl import devstack
from gatewayctl.devstack.credentials import inner_client_context
from tests.e2e.helpers import REPO, authz_transport, stack_config

T = TypeVar("T")

PROTOCOL = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {}}
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05
ISSUER = "https://dev-issuer.mcp-gateway.local"


@dataclass
class Gateway:
    """A running stack plus what the tests need to reach and inspect it."""

    stack: devstack.Stack
    tmp: Path
    ledger: Path

    @property
    def config(self) -> GatewayConfig:
        return self.stack.config

    # ----------------------------------------------------------------------------- tokens

    def token(self, *roles: str, sub: str = "alice", tenant: str | None = "acme",
              ttl: int = 600) -> str:
        return devstack.mint(self.config, sub=sub, roles=roles or ("admin",), tenant=tenant,
                             ttl=ttl)

    def token_for(self, server: str, *roles: str) -> str:
        """A token whose audience is ``server`` alone."""
        return devstack.mint(self.config, sub="alice", roles=roles or ("admin",), tenant="acme",
                             ttl=600, server=server)

    # ------------------------------------------------------------------------------- TLS

    def tls(self) -> ssl.SSLContext:
        assert self.stack.ca_file is not None
        return ssl.create_default_context(cafile=str(self.stack.ca_file))

    def connection(self, timeout: float = 15.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.config.listen.host, self.config.listen.port,
                                           context=self.tls(), timeout=timeout)

    def url(self, server: str) -> str:
        return self.config.resource_url(server)

    # ---------------------------------------------------------------------- the ledger

    def ledger_lines(self) -> list[dict[str, Any]]:
        try:
            text = self.ledger.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]

    def header_lines(self) -> list[dict[str, Any]]:
        try:
            text = self.ledger.with_suffix(".headers.jsonl").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]

    # -------------------------------------------------------------------- Envoy's view

    def admin_get(self, path: str) -> str:
        url = f"http://{self.config.admin.host}:{self.config.admin.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    def stat(self, name: str) -> int:
        """One Envoy counter or gauge (0 when Envoy has not created it yet)."""
        text = self.admin_get(f"/stats?filter=^{name}$")
        return int(text.split(":")[1]) if ":" in text else 0

    def healthy_hosts(self, cluster: str) -> set[int]:
        """Ports of the hosts Envoy currently routes to in ``cluster`` (health-checked and
        not ejected by outlier detection)."""
        data = json.loads(self.admin_get("/clusters?format=json"))
        out: set[int] = set()
        for entry in data.get("cluster_statuses", []):
            if entry["name"] != cluster:
                continue
            for host in entry.get("host_statuses", []):
                status = host.get("health_status", {})
                flags = [k for k, v in status.items() if v is True]
                if status.get("eds_health_status") == "HEALTHY" and not flags:
                    out.add(int(host["address"]["socket_address"]["port_value"]))
        return out

    def wait_hosts(self, cluster: str, ports: set[int]) -> None:
        """Poll until Envoy routes to exactly ``ports`` in ``cluster``."""
        wait_for(lambda: self.healthy_hosts(cluster) == ports or None,
                 f"{cluster} hosts == {sorted(ports)}")

    def connections(self, cluster: str, port: int) -> int:
        """Envoy's open connections to one host of ``cluster``."""
        suffix = f":{port}::cx_active::"
        for line in self.admin_get("/clusters").splitlines():
            if line.startswith(f"{cluster}::") and suffix in line:
                return int(line.rsplit("::", 1)[1])
        return 0

    def metric(self, component: str, name: str) -> float:
        """Sum of one Prometheus sample family over the live instances of ``component``."""
        total = 0.0
        for comp in self.stack.components:
            if comp.name != component or comp.metrics_url is None:
                continue
            if self.stack.procs[comp.label].poll() is not None:
                continue
            # inner_tls: a server's same-port /metrics wants the gateway's client certificate.
            ctx = inner_client_context(self.config) if comp.metrics_url.startswith("https:") else None
            with urllib.request.urlopen(comp.metrics_url, timeout=5, context=ctx) as reply:
                text = reply.read().decode()
            for line in text.splitlines():
                if line.startswith(name) and line[len(name)] in " {":
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def instance_ports(self, component: str) -> list[int]:
        return [c.port for c in self.stack.components if c.name == component]

    # -------------------------------------------------------------------- processes

    def kill(self, label: str, sig: signal.Signals = signal.SIGKILL) -> subprocess.Popen[bytes]:
        proc = self.stack.procs[label]
        os.killpg(proc.pid, sig)
        return proc

    def restart(self, label: str) -> None:
        """Start a stopped component again on its own port (same argv and environment as the
        stack gives it) and wait for its health check."""
        proc = self.stack.procs[label]
        if proc.poll() is None:
            raise AssertionError(f"{label} is still running")
        comp = next(c for c in self.stack.components if c.label == label)
        env = {k: v for k, v in os.environ.items() if k not in self.config.secrets}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = child_pythonpath()
        # No parent-death hook: the stack's stop() (fixture teardown) ends it like the others.
        self.stack._spawn(comp, None, devstack.base_dir(self.config), env)  # noqa: SLF001
        self.stack.wait_healthy([comp])


def wait_for(check: Callable[[], T | None], what: str, timeout: float = WAIT_SECONDS) -> T:
    """Poll ``check`` until it returns something other than None/False, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def policy_dir(tmp: Path) -> Path:
    """The example policy, with the counter server added to its data (same roles as files)."""
    out = tmp / "policies"
    out.mkdir()
    for rego in (REPO / "policies").glob("*.rego"):
        if not rego.name.endswith("_test.rego"):
            shutil.copy(rego, out / rego.name)
    data = json.loads((REPO / "policies" / "data.json").read_text(encoding="utf-8"))
    gw = data["gateway"]
    gw["servers"]["counter"] = {"tenants": ["*"]}
    for role in ("admin", "engineer"):
        gw["roles"][role]["tools"]["counter"] = ["*"]
    (out / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return out


def counter_spec(ledger: Path) -> dict[str, Any]:
    return {"module": "tests.reliability.counter_server",
            "args": ["--ledger", str(ledger), "--shutdown-timeout", "20"]}


def child_pythonpath() -> str:
    """PYTHONPATH that lets the stack's children (which run in the config's folder) import the
    test servers under ``tests/``."""
    current = os.environ.get("PYTHONPATH")
    return f"{REPO}{os.pathsep}{current}" if current else str(REPO)


@contextlib.contextmanager
def _importable_tests() -> Iterator[None]:
    # devstack hands its children this process's environment as it is when they start.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = child_pythonpath()
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextlib.contextmanager
def gateway(tmp: Path, servers: dict[str, dict[str, Any]] | None = None, *,
            overrides: dict[str, Any] | None = None, ext_proc: bool | None = None,
            instances: int = 2) -> Iterator[Gateway]:
    """A running stack with the counter server (and ``servers``), config ``overrides`` merged in
    at the top level, the policy copy from :func:`policy_dir`."""
    ledger = tmp / "ledger.jsonl"
    specs = {"counter": counter_spec(ledger), **(servers or {})}
    path = stack_config(tmp, servers=specs, instances=instances, authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["policy"] = {"engine": "embedded", "dir": str(policy_dir(tmp))}
    raw.update(overrides or {})
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    config = load_config(path)
    # Workaround for a start-up race (reported): ext_authz and ext_proc processes opening a fresh
    # catalog together can fail on `PRAGMA journal_mode = WAL` with "database is locked". A
    # catalog that already exists in WAL mode avoids it.
    Catalog(config.catalog.path).close()
    stack = devstack.Stack(config, ext_proc=ext_proc)
    with _importable_tests():
        stack.start(detach=False)
    try:
        yield Gateway(stack, tmp, ledger)
    finally:
        stack.stop()


def call_body(tool: str, arguments: dict[str, Any], rid: str | int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": dict(META)}}


def call_headers(bearer: str | None, tool: str | None = None,
                 method: str = "tools/call") -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": PROTOCOL, "mcp-method": method}
    if tool is not None:
        headers["mcp-name"] = tool
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    return headers
