"""Fixtures of the operator tooling tests: a dev stack config on free loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import stack_config

# Stand-in MCP servers (tests/e2e/standin_upstream.py): the stack's life cycle without real tools.
STANDIN = {"files": {"module": "tests.e2e.standin_upstream"}}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return stack_config(tmp_path, servers=STANDIN)
