"""The official MCP conformance suite (@modelcontextprotocol/conformance 0.1.16) against the
``conformance`` server, run as real processes: every server scenario must pass."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance_suite import (
    EXPECTED_FAILURES,
    REPO,
    listed_server_scenarios,
    require_conformance,
    run_suite,
)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``python -m mcp_servers.conformance --port 0`` and read its port from the log."""
    log_path = tmp_path_factory.mktemp("conformance") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_servers.conformance", "--port", "0", "--log-level", "INFO"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            port = None
            while port is None and proc.poll() is None and time.monotonic() < deadline:
                for line in log_path.read_text(errors="replace").splitlines():
                    if '"message":"listening"' in line:
                        port = json.loads(line)["port"]
                if port is None:
                    time.sleep(0.05)  # poll interval for the log file, bounded by the deadline
            if port is None:
                pytest.fail(f"conformance server did not start:\n{log_path.read_text(errors='replace')}")
            # localhost (not 127.0.0.1): the DNS-rebinding scenario requires a localhost URL.
            yield f"http://localhost:{port}/mcp"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_every_server_scenario_passes(server_url: str, tmp_path: Path) -> None:
    """All server scenarios of the suite (active and pending, every spec version) pass."""
    require_conformance()
    expected = listed_server_scenarios()
    assert len(expected) >= 30, expected
    run = run_suite(server_url, tmp_path / "results")
    problems, unexpected_passes = run.verdict(EXPECTED_FAILURES, expected)
    assert not problems, "\n".join(problems) + "\n--- suite output ---\n" + run.output
    assert not unexpected_passes, f"listed as expected failures but passed: {unexpected_passes}"
    assert run.returncode == 0, run.output
