"""``mcp-gateway up|down|status|token``: the dev stack's life cycle through the CLI.

These start the real Envoy and the real ext_authz with stand-in MCP servers
(tests/e2e/standin_upstream.py) on free ports in a temp state dir.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gatewayctl import devstack
from gatewayctl.devstack import supervisor
from tests.e2e.helpers import REPO

CLI = [sys.executable, "-m", "gatewayctl.cli"]
DEADLINE = 60.0


def cli_env() -> dict[str, str]:
    # Children import the stand-ins from tests/, which is not an installed package.
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_cli(config: Path, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--config", str(config), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO, check=False)


def pid_gone(pid: int) -> bool:
    return supervisor._start_time(pid) is None


def wait_for(predicate: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def detached(config_file: Path) -> Iterator[Path]:
    up = run_cli(config_file, "up", "--detach")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        yield config_file
    finally:
        run_cli(config_file, "down")


def test_detach_status_down_leaves_no_process(detached: Path) -> None:
    """`up --detach` returns healthy; `status --json` lists every process; `down` stops them all."""
    status = run_cli(detached, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["running"] and report["healthy"]
    rows = report["components"]
    planned = devstack.plan(load_config(detached))  # ext_proc too, once it is installed
    assert [(r["component"], r["instance"]) for r in rows] == [(c.name, c.instance) for c in planned]
    assert {"jwks", "ext_authz", "files", "envoy"} <= {r["component"] for r in rows}
    assert all(r["alive"] and r["healthy"] and r["pid"] > 0 for r in rows)
    pids = [r["pid"] for r in rows]

    again = run_cli(detached, "up", "--detach")
    assert again.returncode == 1 and "already running" in again.stderr

    down = run_cli(detached, "down")
    assert down.returncode == 0 and f"stopped {len(pids)}" in down.stdout
    assert all(pid_gone(p) for p in pids)
    after = run_cli(detached, "status", "--json")
    assert after.returncode == 3 and json.loads(after.stdout)["components"] == []


def test_token_command_is_accepted_by_the_stack(detached: Path) -> None:
    """A token from `mcp-gateway token` passes the running stack's ext_authz; no token is a 401."""
    config = load_config(detached)
    token = run_cli(detached, "token", "--sub", "alice", "--role", "admin", "--server", "files")
    assert token.returncode == 0, token.stderr
    ctx = ssl.create_default_context(cafile=str(devstack.paths(config).ca_cert))
    # ping: an answer ext_proc does not inspect (the stand-in's echo is no real tools/list answer,
    # which ext_proc would refuse with a 502).
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2025-11-25"}
    conn = http.client.HTTPSConnection("127.0.0.1", config.listen.port, context=ctx, timeout=10)
    conn.request("POST", "/mcp/files", body=body,
                 headers={**headers, "authorization": f"Bearer {token.stdout.strip()}"})
    reply = conn.getresponse()
    echoed = json.loads(reply.read())
    assert reply.status == 200
    assert echoed["result"]["path"] == "/mcp"
    assert echoed["result"]["headers"]["x-mcp-user"] == "alice"
    assert "authorization" not in echoed["result"]["headers"]
    conn.request("POST", "/mcp/files", body=body, headers=headers)
    denied = conn.getresponse()
    denied.read()
    assert denied.status == 401
    conn.close()


def test_foreground_ctrl_c_stops_everything(config_file: Path) -> None:
    """Ctrl-C (SIGINT) to a foreground `up` stops every child; no orphans remain."""
    config = load_config(config_file)
    proc = subprocess.Popen([*CLI, "--config", str(config_file), "up"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=REPO)
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        def ready() -> bool:
            assert proc.poll() is None, "".join(lines)
            return any("Ctrl-C stops everything" in line for line in lines)
        wait_for(ready, "the foreground stack's banner")
        rows = devstack.status(config)
        assert len(rows) == len(devstack.plan(config)) and all(r["healthy"] for r in rows)
        pids = [r["pid"] for r in rows]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE)
        reader.join(timeout=DEADLINE)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE)
        proc.stdout.close()
    assert proc.returncode == 0, out
    assert "Ctrl-C stops everything" in out and "export MCP_TOKEN=" in out
    assert all(pid_gone(p) for p in pids)
    assert not devstack.paths(config).pid_file.exists()


def test_cli_port_in_use_fails_fast(config_file: Path) -> None:
    """`up` on a taken port exits 1 with a message naming the port, without hanging."""
    config = load_config(config_file)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.listen.port))
        busy.listen()
        result = run_cli(config_file, "up", "--detach")
    assert result.returncode == 1
    assert f"port {config.listen.port}" in result.stderr and "already in use" in result.stderr


def test_token_without_a_stack_key_is_refused(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`token` refuses to mint when the stack's signing key does not exist, instead of making one."""
    from gatewayctl.cli import main

    assert not devstack.paths(load_config(config_file)).signing_key.exists()
    assert main(["--config", str(config_file), "token", "--sub", "alice"]) != 0
    assert "no dev signing key" in capsys.readouterr().err
    assert not devstack.paths(load_config(config_file)).signing_key.exists()


def test_status_shows_envoys_view_of_each_upstream(detached: Path) -> None:
    """`status` says how Envoy sees each instance it routes to (its health checks and outlier
    detection), next to the gateway's own probe: a killed server instance turns from healthy to
    a failed health check in Envoy's eyes; processes Envoy routes nothing to have no such view."""
    def rows() -> list[dict[str, Any]]:
        status = run_cli(detached, "status", "--json")
        parsed: list[dict[str, Any]] = json.loads(status.stdout)["components"]
        return parsed

    first = rows()
    seen = {(r["component"], r["instance"]): r["envoy"] for r in first}
    assert seen[("files", 0)] == seen[("files", 1)] == "healthy"
    assert seen[("ext_authz", 0)] == "healthy"
    assert seen[("jwks", 0)] is None and seen[("envoy", 0)] is None
    victim = next(r for r in first if (r["component"], r["instance"]) == ("files", 1))
    os.killpg(victim["pid"], signal.SIGKILL)
    wait_for(lambda: pid_gone(victim["pid"]), "the files instance to die")

    def envoy_noticed() -> bool:
        now = {(r["component"], r["instance"]): r["envoy"] for r in rows()}
        return now[("files", 1)] not in ("healthy", None) and now[("files", 0)] == "healthy"
    wait_for(envoy_noticed, "Envoy to stop sending the dead instance traffic")
    table = run_cli(detached, "status")
    assert "ENVOY SEES" in table.stdout
    assert re.search(r"files\s+1\s+\S+\s+-?\d*\s+stopped\s+(failed health check|ejected)",
                     table.stdout), table.stdout


def test_restart_one_instance_and_all_of_a_component(detached: Path) -> None:
    """`restart files 1` replaces that instance only (same address, healthy again, the other
    untouched); `restart ext_authz` replaces every instance; the PID file names the new
    processes, so `down` stops them; an unknown component is a clear error."""
    def pids() -> dict[tuple[str, int], int]:
        rows = json.loads(run_cli(detached, "status", "--json").stdout)["components"]
        return {(r["component"], r["instance"]): r["pid"] for r in rows}

    before = pids()
    one = run_cli(detached, "restart", "files", "1")
    assert one.returncode == 0, one.stderr
    assert "files[1] restarted" in one.stdout
    after = pids()
    assert after[("files", 1)] != before[("files", 1)] and pid_gone(before[("files", 1)])
    assert after[("files", 0)] == before[("files", 0)]

    every = run_cli(detached, "restart", "ext_authz")
    assert every.returncode == 0, every.stderr
    again = pids()
    assert all(again[("ext_authz", i)] != after[("ext_authz", i)] for i in (0, 1))
    status = run_cli(detached, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["healthy"]

    unknown = run_cli(detached, "restart", "nosuch")
    assert unknown.returncode == 1 and "no nosuch in the running stack" in unknown.stderr
    assert run_cli(detached, "down").returncode == 0
    assert all(pid_gone(pid) for pid in again.values())
