"""The official conformance suite (@modelcontextprotocol/conformance, ``--suite all``) against the
bridge in front of server-everything over stdio: the bridge is a conformant Streamable HTTP server.

The scenarios below call fixtures only the suite's reference server has (tools such as
``test_image_content``, prompts such as ``test_simple_prompt``, ``test://`` resources);
server-everything has other ones, so those scenarios fail for the server, not for the transport.
Every other scenario (initialize, ping, logging level, lists, errors, SSE streams, subscriptions,
DNS-rebinding protection) must pass, and a listed one that starts passing fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mcp_bridge.conftest import NODE, TOOLS, RunningBridge, run_bridge

CONFORMANCE = TOOLS / "node_modules" / ".bin" / "conformance"
SUITE_TIMEOUT = 300
_FIXTURE = "server-everything lacks the suite's fixture"
EXPECTED_FAILURES: dict[str, str] = {name: _FIXTURE for name in (
    "completion-complete", "tools-call-image", "tools-call-audio", "tools-call-embedded-resource",
    "tools-call-mixed-content", "tools-call-with-logging", "tools-call-with-progress",
    "tools-call-sampling", "tools-call-elicitation", "json-schema-2020-12",
    "elicitation-sep1034-defaults", "elicitation-sep1330-enums", "resources-read-text",
    "resources-read-binary", "resources-templates-read", "prompts-get-simple",
    "prompts-get-with-args", "prompts-get-embedded-resource", "prompts-get-with-image")}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, everything_argv: list[str]) -> Iterator[RunningBridge]:
    # The suite opens a session per scenario and ends few of them: room for all (a child each).
    with run_bridge(tmp_path_factory.mktemp("conformance"), everything_argv, "--pool", "1",
                    "--max-sessions", "64") as running:
        yield running


def test_conformance_suite_through_the_bridge(bridge: RunningBridge, tmp_path: Path) -> None:
    """Every scenario that does not need the reference server's fixtures passes."""
    if not CONFORMANCE.exists():
        pytest.fail(f"{CONFORMANCE} is missing: run `make tools` (npm install of tests/conformance)")
    env = {**os.environ, "PATH": f"{NODE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out_dir = tmp_path / "results"
    # localhost (not 127.0.0.1): the DNS-rebinding scenario requires a localhost URL.
    run = subprocess.run([str(CONFORMANCE), "server", "--url", f"http://localhost:{bridge.port}/mcp",
                          "--suite", "all", "-o", str(out_dir)],
                         capture_output=True, text=True, env=env, timeout=SUITE_TIMEOUT, check=False)
    results: dict[str, list[dict[str, object]]] = {}
    for checks_file in out_dir.glob("server-*/checks.json"):
        scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", checks_file.parent.name)
        results[scenario] = json.loads(checks_file.read_text())
    assert len(results) >= 30, run.stdout[-4000:]
    problems: list[str] = []
    unexpected_passes: list[str] = []
    for scenario, checks in sorted(results.items()):
        bad = [c for c in checks if c.get("status") in ("FAILURE", "WARNING")]
        if scenario in EXPECTED_FAILURES:
            if not bad:
                unexpected_passes.append(scenario)
            continue
        problems += [f"{scenario}: {c.get('id')} {c.get('status')}: {c.get('errorMessage')}" for c in bad]
    assert not problems, "\n".join(problems) + "\n--- bridge log ---\n" + bridge.logs()[-3000:]
    assert not unexpected_passes, f"listed as expected failures but passed: {unexpected_passes}"
