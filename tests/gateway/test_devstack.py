"""The dev stack: planning, certificates, tokens, ports, and the up/status/down life cycle.

Life-cycle tests start the real Envoy and the real ext_authz with stand-in MCP servers
(tests/e2e/standin_upstream.py) on free ports in a temp state dir.
"""

from __future__ import annotations

import http.client
import json
import os
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

import jwt
import pytest
import yaml
from cryptography import x509

from gateway import devstack
from gateway.config import load_config, parse_config
from tests.e2e.helpers import REPO, stack_config

STANDIN = {"files": {"module": "tests.e2e.standin_upstream"}}
CLI = [sys.executable, "-m", "gatewayctl.cli"]
DEADLINE = 60.0


def cli_env() -> dict[str, str]:
    # Children import the stand-ins from tests/, which is not an installed package.
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_cli(config: Path, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--config", str(config), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO, check=False)


def pid_gone(pid: int) -> bool:
    return devstack._start_time(pid) is None


def wait_for(predicate: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return stack_config(tmp_path, servers=STANDIN)


# ------------------------------------------------------------------------------------ pure parts

def test_plan_starts_envoy_last_and_passes_instance_ports(config_file: Path) -> None:
    """Processes are planned JWKS first, Envoy last, each server instance with its own port."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    names = [c.label for c in comps]
    assert names == ["jwks[0]", "ext_authz[0]", "ext_authz[1]", "files[0]", "files[1]", "envoy[0]"]
    files0 = comps[3]
    assert files0.argv[1:3] == ("-m", "tests.e2e.standin_upstream")
    assert files0.argv[3:7] == ("--host", "127.0.0.1", "--port", str(config.servers[0].instances[0].port))
    assert comps[1].argv[-2:] == ("--port", str(config.ext_authz.instances[0].port))
    assert [c.name for c in devstack.plan(config, ext_proc=True)].count("ext_proc") == 2


def test_services_get_the_users_config_file(config_file: Path) -> None:
    """ext_authz gets --config with the user's file; with the embedded default, no --config."""
    comps = devstack.plan(load_config(config_file), ext_proc=False)
    assert comps[1].argv[3:5] == ("--config", str(config_file.resolve()))
    default = devstack.plan(load_config(), ext_proc=False)
    authz = next(c for c in default if c.name == "ext_authz")
    assert "--config" not in authz.argv


def test_dev_certificates(config_file: Path) -> None:
    """The dev CA signs a server certificate for the loopback names; keys are private; reused."""
    config = load_config(config_file)
    ca_file = devstack.ensure_tls(config)
    assert ca_file is not None
    cert = x509.load_pem_x509_certificate(Path(config.tls.cert_file).read_bytes())
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert Path(config.tls.key_file).stat().st_mode & 0o077 == 0
    before = Path(config.tls.cert_file).read_bytes()
    assert devstack.ensure_tls(config) == ca_file
    assert Path(config.tls.cert_file).read_bytes() == before
    # A TLS client trusting only the dev CA accepts the chain for 127.0.0.1.
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_verify_locations(cadata=before.decode())


def test_missing_user_certificate_is_an_error(tmp_path: Path) -> None:
    """A certificate path outside state_dir that does not exist is reported, never invented."""
    raw = yaml.safe_load(stack_config(tmp_path).read_text())
    raw["tls"]["cert_file"] = str(tmp_path / "elsewhere" / "cert.pem")
    config = parse_config(raw, base_dir=tmp_path)
    with pytest.raises(devstack.StackError, match="does not exist"):
        devstack.ensure_tls(config)


def test_tokens_match_the_served_jwks(config_file: Path) -> None:
    """`mint` signs with the dev key whose JWKS the stack serves; audience and scopes per server."""
    config = load_config(config_file)
    token = devstack.mint(config, sub="alice", roles=("analyst",), tenant="acme", ttl=60, server="files")
    jwks = json.loads((devstack.paths(config).jwks_root / "jwks.json").read_text())
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name],
                        audience=config.resource_url("files"), issuer=config.issuers[0].issuer)
    assert claims["sub"] == "alice" and claims["roles"] == ["analyst"] and claims["tenant"] == "acme"
    assert claims["scope"] == "tools:call:files/*"
    expired = devstack.mint(config, sub="bob", ttl=-30)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, key.key, algorithms=[key.algorithm_name], audience=config.resource_url("files"))


def test_port_in_use_is_named(config_file: Path) -> None:
    """A port that is already taken fails fast with its number and the component's name."""
    config = load_config(config_file)
    port = config.servers[0].instances[1].port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(devstack.StackError, match=rf"port {port} .*files\[1\].* already in use"):
            devstack.Stack(config, ext_proc=False).prepare()


def test_duplicate_ports_are_rejected(config_file: Path) -> None:
    """Two components configured on one port are reported before anything starts."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    ports = devstack.listening_ports(config, comps) + [("extra", "127.0.0.1", comps[0].port)]
    with pytest.raises(devstack.StackError, match="configured for both"):
        devstack.check_ports(ports)


def test_component_that_dies_at_start_up_stops_the_stack(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that exits while starting fails `up` with its log tail and leaves nothing running."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    config = load_config(stack_config(tmp_path, servers={"files": {"module": "tests.e2e.no_such_module"}}))
    stack = devstack.Stack(config, ext_proc=False, startup_timeout=DEADLINE)
    with pytest.raises(devstack.StackError, match=r"files\[\d\] exited with code 1") as err:
        stack.start(detach=False)
    assert "No module named" in str(err.value)
    assert all(p.poll() is not None for p in stack.procs.values())
    assert not devstack.paths(config).pid_file.exists()


# --------------------------------------------------------------------------------- life cycle

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


def test_backends_start_first_and_secrets_go_only_where_listed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends are wave 0; a dev secret is generated once (0600), reused, overridable from the
    environment, and only components that list it receive it."""
    extra = {"secrets": ["ERP_API_KEY"],
             "backends": {"erp_demo": {"module": "mcp_servers.erp_demo", "instance": {"port": 9230},
                                       "env": ["ERP_API_KEY"]}}}
    servers: dict[str, dict[str, Any]] = {
        "erp": {"module": "tests.e2e.standin_upstream", "env": ["ERP_API_KEY"]},
               "files": {"module": "tests.e2e.standin_upstream"}}
    config = load_config(stack_config(tmp_path, servers=servers, extra=extra))
    comps = devstack.plan(config, ext_proc=False)
    assert comps[0].name == "erp_demo" and comps[0].wave == 0 and comps[-1].wave == 2
    assert {c.name for c in comps if c.env} == {"erp_demo", "erp"}
    monkeypatch.delenv("ERP_API_KEY", raising=False)
    first = devstack.ensure_secrets(config)
    stored = devstack.paths(config).secrets_dir / "ERP_API_KEY"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert devstack.ensure_secrets(config) == first and len(first["ERP_API_KEY"]) >= 32
    monkeypatch.setenv("ERP_API_KEY", "from-the-operator")
    assert devstack.ensure_secrets(config) == {"ERP_API_KEY": "from-the-operator"}


def test_banner_says_where_traces_metrics_and_audit_are(config_file: Path) -> None:
    """The banner names the tracing state, each live /metrics URL and the audit folder."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    lines = "\n".join(devstack.observability_lines(config, comps, live=lambda url: "stats" in url))
    assert "Traces: off" in lines
    assert f"http://{config.admin.host}:{config.admin.port}/stats/prometheus" in lines
    assert "/metrics" not in lines  # none of the stand-ins serves one
    assert f"Audit trail (JSON lines, one file per process): {config.audit.dir}/" in lines


def test_token_without_a_stack_key_is_refused(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`token` refuses to mint when the stack's signing key does not exist, instead of making one."""
    from gatewayctl.cli import main

    assert not devstack.paths(load_config(config_file)).signing_key.exists()
    assert main(["--config", str(config_file), "token", "--sub", "alice"]) != 0
    assert "no dev signing key" in capsys.readouterr().err
    assert not devstack.paths(load_config(config_file)).signing_key.exists()
