"""The supervisor: a component that fails at start-up stops the whole stack.

The life cycle through the CLI (up, status, down, Ctrl-C) is in tests/gatewayctl/commands/test_stack.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gatewayctl import devstack
from tests.e2e.helpers import REPO, stack_config

DEADLINE = 60.0


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
