"""The official conformance suite (@modelcontextprotocol/conformance, ``--suite all``) against the
bridge alone: the bridge is a conformant Streamable HTTP server in front of a stdio server.

- In front of ``python -m mcp_servers.conformance --stdio`` (the suite's fixtures, over stdio):
  every scenario passes, as it does against the same server over HTTP
  (tests/mcp_servers/conformance), with the same expected failures.
- In front of server-everything: the scenarios that call fixtures only the suite's reference server
  has (tools such as ``test_image_content``, prompts such as ``test_simple_prompt``, ``test://``
  resources) fail for the server, not for the transport; every other scenario (initialize, ping,
  logging level, lists, errors, SSE streams, subscriptions, DNS-rebinding protection) passes.
A listed scenario that starts passing fails the test.
"""

from __future__ import annotations

import sys
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
from tests.mcp_bridge.conftest import RunningBridge, run_bridge

_FIXTURE = "server-everything lacks the suite's fixture"
EVERYTHING_EXPECTED_FAILURES: dict[str, str] = {name: _FIXTURE for name in (
    "completion-complete", "tools-call-image", "tools-call-audio", "tools-call-embedded-resource",
    "tools-call-mixed-content", "tools-call-with-logging", "tools-call-with-progress",
    "tools-call-sampling", "tools-call-elicitation", "json-schema-2020-12",
    "elicitation-sep1034-defaults", "elicitation-sep1330-enums", "resources-read-text",
    "resources-read-binary", "resources-templates-read", "prompts-get-simple",
    "prompts-get-with-args", "prompts-get-embedded-resource", "prompts-get-with-image")}
# The suite opens a session per scenario and ends few of them: room for all (a child each).
BRIDGE_OPTIONS = ("--pool", "1", "--max-sessions", "64")


@pytest.fixture(scope="module")
def conformance_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBridge]:
    """The bridge in front of the conformance server over stdio (cwd: the checkout, for ``-m``)."""
    argv = [sys.executable, "-m", "mcp_servers.conformance", "--stdio"]
    with run_bridge(tmp_path_factory.mktemp("conformance"), argv, *BRIDGE_OPTIONS,
                    "--workdir", str(REPO)) as running:
        yield running


@pytest.fixture(scope="module")
def everything_bridge(tmp_path_factory: pytest.TempPathFactory,
                      everything_argv: list[str]) -> Iterator[RunningBridge]:
    with run_bridge(tmp_path_factory.mktemp("everything"), everything_argv, *BRIDGE_OPTIONS) as running:
        yield running


def _assert_suite_passes(bridge: RunningBridge, out_dir: Path, expected_failures: dict[str, str],
                         expected_scenarios: set[str] | None = None) -> None:
    # localhost (not 127.0.0.1): the DNS-rebinding scenario requires a localhost URL.
    run = run_suite(f"http://localhost:{bridge.port}/mcp", out_dir)
    assert len(run.results) >= 30, run.output
    problems, unexpected_passes = run.verdict(expected_failures, expected_scenarios)
    assert not problems, "\n".join(problems) + "\n--- bridge log ---\n" + bridge.logs()[-3000:]
    assert not unexpected_passes, f"listed as expected failures but passed: {unexpected_passes}"


def test_conformance_server_over_stdio_through_the_bridge(conformance_bridge: RunningBridge,
                                                          tmp_path: Path) -> None:
    """Every server scenario passes through the bridge, as directly against the HTTP server."""
    require_conformance()
    _assert_suite_passes(conformance_bridge, tmp_path / "results", EXPECTED_FAILURES,
                         listed_server_scenarios())


def test_everything_through_the_bridge(everything_bridge: RunningBridge, tmp_path: Path) -> None:
    """Every scenario that does not need the reference server's fixtures passes."""
    _assert_suite_passes(everything_bridge, tmp_path / "results", EVERYTHING_EXPECTED_FAILURES)
