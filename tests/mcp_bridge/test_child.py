"""A real child process: framed I/O, stop escalation, no zombie and no orphan left."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mcp_bridge.child import Child, ExitInfo
from mcp_bridge.settings import BridgeSettings

WAIT = 20.0


def _settings(script: str, **kw: Any) -> BridgeSettings:
    return BridgeSettings(argv=(sys.executable, "-c", textwrap.dedent(script)), stop_grace=0.3, **kw)


class Recorder:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.exits: list[ExitInfo] = []

    def on_message(self, message: dict[str, Any]) -> None:
        self.messages.put_nowait(message)

    def on_exit(self, _child: Child, info: ExitInfo) -> None:
        self.exits.append(info)


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def _group_running(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group. Orphans of this test process go to init,
    which reaps them when it gets to it, so a zombie member here is not a leak."""
    running = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                running.append(int(entry.name))
    return running


ECHO = """
    import json, sys
    print("not json at all", flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {"echo": msg["method"]}}), flush=True)
"""


async def test_messages_flow_and_bad_lines_are_skipped() -> None:
    """A request goes to stdin as one line; the answer comes back; a non-JSON line is skipped."""
    rec = Recorder()
    child = Child(_settings(ECHO), "t", rec.on_message, rec.on_exit)
    await child.start()
    child.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    got = await asyncio.wait_for(rec.messages.get(), WAIT)
    assert got == {"jsonrpc": "2.0", "id": 1, "result": {"echo": "ping"}}
    info = await asyncio.wait_for(child.stop(), WAIT)
    assert info.reason == "stopped" and info.status == 0  # stdin closed: the loop ended cleanly
    assert rec.exits == [info]


STUBBORN = """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A grandchild in the same process group that also ignores SIGTERM.
    subprocess.Popen([sys.executable, "-c",
                      "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print('{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"up"}}',
          flush=True)
    sys.stdin.close()
    time.sleep(600)
"""


async def test_stop_escalates_to_sigkill_and_leaves_nothing() -> None:
    """A child ignoring stdin EOF and SIGTERM is killed with its whole group, and reaped."""
    rec = Recorder()
    child = Child(_settings(STUBBORN), "t", rec.on_message, rec.on_exit)
    await child.start()
    await asyncio.wait_for(rec.messages.get(), WAIT)  # the grandchild exists now
    pid = child.pid
    assert pid is not None
    info = await asyncio.wait_for(child.stop(), WAIT)
    assert info.status == -9
    assert _state(pid) is None  # reaped: no zombie
    assert _group_running(pid) == []  # no orphan from its process group


async def test_oversize_line_kills_the_child() -> None:
    """A stdout line over the limit ends the child with reason line_too_long."""
    rec = Recorder()
    script = """
        import sys, time
        sys.stdout.write("x" * 5000); sys.stdout.flush(); time.sleep(600)
    """
    child = Child(_settings(script, max_line_bytes=1024), "t", rec.on_message, rec.on_exit)
    await child.start()
    await asyncio.wait_for(child.exited.wait(), WAIT)
    assert child.exit is not None and child.exit.reason == "line_too_long"
    assert child.pid is not None and _group_running(child.pid) == []


async def test_exit_is_reported_with_status() -> None:
    """A child that exits on its own reports its status once."""
    rec = Recorder()
    child = Child(_settings("import sys; sys.exit(3)"), "t", rec.on_message, rec.on_exit)
    await child.start()
    await asyncio.wait_for(child.exited.wait(), WAIT)
    assert len(rec.exits) == 1
    assert rec.exits[0].status == 3 and rec.exits[0].reason in ("exited", "stdout_closed")


def test_child_environment_is_the_allowlist_plus_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the allowlist and the --env names reach the child; an unset --env name is refused."""
    monkeypatch.setenv("SECRET_TOKEN", "s3cret")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("PATH", "/usr/bin")
    settings = BridgeSettings.from_argv(["--port", "1", "--env", "API_KEY", "--", "srv"])
    env = settings.child_env()
    assert env["API_KEY"] == "k" and env["PATH"] == "/usr/bin"
    assert "SECRET_TOKEN" not in env
    assert set(env) <= {"HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TZ", "API_KEY"}
    with pytest.raises(SystemExit):
        BridgeSettings.from_argv(["--port", "1", "--env", "NOT_SET_ANYWHERE", "--", "srv"])
    with pytest.raises(ValueError):
        BridgeSettings.from_argv(["--port", "1"])
