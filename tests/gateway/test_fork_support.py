"""gRPC's fork handlers are off in every gateway process unless the environment turns them on:
processes that hold gRPC channels start others (dev stack, tests), and the handlers can abort a
child between fork and exec (gateway/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "import gateway, os; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"


def _probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=60, check=True)
    return out.stdout.strip()


def test_importing_gateway_turns_grpc_fork_handlers_off() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    assert _probe(env) == "false"


def test_an_explicit_setting_wins() -> None:
    assert _probe({**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"}) == "true"


def test_this_test_process_has_them_off_before_grpc_loads() -> None:
    # tests/conftest.py imports gateway first; the dev stack's children inherit the setting.
    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") == "false"
