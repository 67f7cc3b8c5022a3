"""The command line and settings of the aggregator, and the process it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.aggregate.session_token import new_key
from gateway.aggregate.views import AGGREGATE_VIEW
from gateway.config import load_config
from mcp_aggregator.settings import AggregatorSettings
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "gateway" / "default_config.yaml"


def test_servers_and_keys_from_the_command_line() -> None:
    """--server names the servers of /mcp; the key ring comes from the named variable."""
    env = {"KEYS": f"{new_key()},{new_key()}"}
    settings = AggregatorSettings.from_argv(
        ["--port", "0", "--upstream-base", "http://127.0.0.1:9300", "--server", "files", "--server", "db",
         "--keys-env", "KEYS"], env)
    assert settings.servers == ("files", "db")
    assert len(settings.keys) == 2
    assert set(settings.views) == {AGGREGATE_VIEW}


def test_config_names_servers_and_views() -> None:
    """--config takes the servers (in order) and virtual servers from the gateway config."""
    env = {"MCP_GATEWAY_AGGREGATE_KEYS": new_key()}
    settings = AggregatorSettings.from_argv(
        ["--port", "0", "--upstream-base", "http://127.0.0.1:9300", "--config", str(DEFAULT_CONFIG)], env)
    assert settings.servers == tuple(s.name for s in load_config(DEFAULT_CONFIG).servers)


@pytest.mark.parametrize("argv", [
    ["--port", "0", "--upstream-base", "http://127.0.0.1:9300", "--server", "files"],  # no key ring
    ["--port", "0", "--upstream-base", "http://127.0.0.1:9300"],  # no servers
    ["--port", "0", "--upstream-base", "http://127.0.0.1:9300", "--server", "a", "--config", "x.yaml"],
])
def test_incomplete_command_lines_are_refused(argv: list[str]) -> None:
    """Without a key ring or servers the aggregator does not start."""
    with pytest.raises(SystemExit):
        AggregatorSettings.from_argv(argv, {})


@pytest.mark.parametrize("base", ["127.0.0.1:9300", "http://127.0.0.1:9300/mcp", "ftp://h:1"])
def test_upstream_base_is_a_bare_http_origin(base: str) -> None:
    """--upstream-base is scheme://host:port; the aggregator adds /mcp/<server> itself."""
    with pytest.raises(ValueError, match="upstream-base"):
        AggregatorSettings.from_argv(["--port", "0", "--upstream-base", base, "--server", "a",
                                      "--keys-env", "K"], {"K": new_key()})


def test_process_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    """python -m mcp_aggregator answers /health and /ready, and exits 0 on SIGTERM."""
    port = free_port()
    env = {**os.environ, "MCP_GATEWAY_AGGREGATE_KEYS": new_key()}
    log = (tmp_path / "aggregator.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mcp_aggregator", "--host", "127.0.0.1", "--port",
                             str(port), "--upstream-base", "http://127.0.0.1:9", "--server", "files"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        ready = False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
                    ready = resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)  # poll interval while waiting against the deadline
        assert ready, (tmp_path / "aggregator.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
