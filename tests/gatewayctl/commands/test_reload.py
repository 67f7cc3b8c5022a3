"""``mcp-gateway reload``: a config change and a certificate rotation reach a running stack
through Envoy's hot restart while clients keep calling, and every request is answered."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from gatewayctl import devstack, envoy_config
from tests.e2e.helpers import stack_config
from tests.gatewayctl.commands.test_stack import pid_gone, run_cli, wait_for
from tests.gatewayctl.conftest import STANDIN


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Path]:
    """A detached stack whose per-user rate limit does not throttle the test's own load."""
    config = stack_config(tmp_path, servers=STANDIN, extra={"rate_limits": {
        "per_user": {"rate_per_second": 100000, "burst": 100000}}})
    up = run_cli(config, "up", "--detach")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        yield config
    finally:
        run_cli(config, "down")


BODY = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
MAX_REQUESTS = 3000  # per client: the load stops by itself even if the test never stops it


class Client(threading.Thread):
    """Calls /mcp/files until told to stop, on one keep-alive connection or a new one per call;
    records every status (or the exception) and whether the answer carried x-reloaded."""

    def __init__(self, config_file: Path, token: str, *, keep_alive: bool) -> None:
        super().__init__(daemon=True)
        config = load_config(config_file)
        self.port = config.listen.port
        self.ctx = ssl.create_default_context(cafile=str(devstack.paths(config).ca_cert))
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {token}",
                        "accept": "application/json, text/event-stream",
                        "mcp-protocol-version": "2025-11-25"}
        self.keep_alive = keep_alive
        self.stop = threading.Event()
        self.outcomes: list[int | str] = []
        self.reloaded = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set() and len(self.outcomes) < MAX_REQUESTS:
            if conn is None or not self.keep_alive:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                                   timeout=10)
            try:
                conn.request("POST", "/mcp/files", body=BODY, headers=self.headers)
                reply = conn.getresponse()
                reply.read()
                self.outcomes.append(reply.status)
                if reply.getheader("x-reloaded") == "yes":
                    self.reloaded.set()
            except (OSError, http.client.HTTPException) as exc:
                self.outcomes.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = None
            if not self.keep_alive and conn is not None:
                conn.close()
        if conn is not None:
            conn.close()


def served_certificate(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        conn.close()


def test_reload_under_load_answers_every_request(detached: Path) -> None:
    config = load_config(detached)
    state = devstack.paths(config)
    token = run_cli(detached, "token", "--sub", "alice", "--role", "admin", "--server", "files")
    assert token.returncode == 0, token.stderr
    before_cert = served_certificate(config.listen.port, state.ca_cert)
    restarter_status = state.state_dir / "envoy-restarter.json"
    first_envoy = json.loads(restarter_status.read_text())["pids"]["0"]

    clients = [Client(detached, token.stdout.strip(), keep_alive=k) for k in (True, False)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: all(len(c.outcomes) >= 20 for c in clients), "traffic before the reload")
        # A config change (a header on every answer) and a rotated certificate.
        raw = yaml.safe_load(detached.read_text())
        raw["envoy"] = {"response_headers": {"x-reloaded": "yes"}}
        detached.write_text(yaml.safe_dump(raw))
        (state.tls_dir / "server.pem").unlink()
        (state.tls_dir / "server.key").unlink()
        reload = run_cli(detached, "reload")
        assert reload.returncode == 0, reload.stderr + reload.stdout
        assert "restart epoch 1" in reload.stdout
        wait_for(lambda: all(c.reloaded.is_set() for c in clients), "answers from the new Envoy")
        counts = [len(c.outcomes) for c in clients]
        wait_for(lambda: all(len(c.outcomes) >= n + 20 for c, n in zip(clients, counts, strict=True)),
                 "traffic after the reload")
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(timeout=30)
    for client in clients:
        failures = [o for o in client.outcomes if o != 200]
        assert not failures, f"keep_alive={client.keep_alive}: {failures[:5]} of {len(client.outcomes)}"
    assert served_certificate(config.listen.port, state.ca_cert) != before_cert

    # The old Envoy drains and exits; the new one runs under the same restarter, and `down`
    # stops both.
    wait_for(lambda: pid_gone(first_envoy), "the old Envoy to exit", timeout=60)
    second_envoy = json.loads(restarter_status.read_text())["pids"]["1"]
    assert not pid_gone(second_envoy)
    status = json.loads(run_cli(detached, "status", "--json").stdout)
    envoy_row = next(r for r in status["components"] if r["component"] == "envoy")
    assert envoy_row["alive"] and envoy_row["healthy"]
    down = run_cli(detached, "down")
    assert down.returncode == 0
    assert pid_gone(envoy_row["pid"]) and pid_gone(second_envoy)


def test_a_config_envoy_refuses_changes_nothing(detached: Path) -> None:
    """A reload whose Envoy config fails validation leaves the running Envoy serving."""
    state = devstack.paths(load_config(detached))
    before = json.loads(state.pid_file.read_text())
    overlay = detached.parent / "templates"
    overlay.mkdir()
    shipped = (envoy_config.TEMPLATE_DIR / "server_cluster.yaml.tmpl").read_text()
    (overlay / "server_cluster.yaml.tmpl").write_text(
        shipped.replace("lb_policy: RING_HASH", "lb_policy: NOT_A_POLICY"))
    raw = yaml.safe_load(detached.read_text())
    raw["envoy"] = {"templates_dir": str(overlay)}
    detached.write_text(yaml.safe_dump(raw))
    reload = run_cli(detached, "reload")
    assert reload.returncode == 1 and "refused" in reload.stderr
    assert json.loads(state.pid_file.read_text()) == before
    assert json.loads((state.state_dir / "envoy-restarter.json").read_text())["epoch"] == 0
    assert all(not pid_gone(e["pid"]) for e in before["components"])


def test_reload_without_a_stack_is_a_clear_error(config_file: Path) -> None:
    reload = run_cli(config_file, "reload")
    assert reload.returncode == 1 and "no running dev stack" in reload.stderr


def test_config_diff_shows_what_a_reload_would_change(detached: Path) -> None:
    """`config diff` compares the rendering the running Envoy carries (its digest, read back
    from the admin interface) with the config as it is now: no difference, then the changed
    lines after an edit, and none again once `reload` applied it."""
    same = run_cli(detached, "config", "diff")
    assert same.returncode == 0, same.stderr
    assert "the running Envoy runs the rendering of" in same.stdout
    raw = yaml.safe_load(detached.read_text())
    raw["envoy"] = {"response_headers": {"x-diffed": "yes"}}
    detached.write_text(yaml.safe_dump(raw))
    changed = run_cli(detached, "config", "diff")
    assert changed.returncode == 1
    assert re.search(r'^\+.*"x-diffed"', changed.stdout, re.MULTILINE), changed.stdout
    assert "`mcp-gateway reload` applies it" in changed.stderr
    assert run_cli(detached, "reload").returncode == 0
    after = run_cli(detached, "config", "diff")
    assert after.returncode == 0, after.stdout + after.stderr
