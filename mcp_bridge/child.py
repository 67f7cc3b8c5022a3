"""One stdio MCP server process: spawn, framed I/O, stderr to the logs, stop, reaping.

The child runs in its own session (so its whole process group can be signalled), with a parent
death signal (so a bridge killed with SIGKILL does not leave it running), a minimal environment
and three pipes; its stderr is never inherited. Stopping follows the SDK's stdio client: close
stdin, wait, SIGTERM to the group, wait, SIGKILL to the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from mcp_bridge.errors import BridgeBusy, UpstreamUnavailable
from mcp_bridge.framing import LineDecoder, LineTooLong, SkipBudget, decode_message, encode_message
from mcp_bridge.settings import BridgeSettings

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 65536


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _die_with_parent() -> None:  # runs in the forked child before exec
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def become_subreaper() -> bool:
    """Adopt the orphans of our children (npx -> node), so :func:`reap_orphans` can wait for them."""
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_orphans() -> list[int]:
    """Wait for exited processes we adopted as subreaper.

    Only zombies that are not process-group leaders are taken: every child this bridge spawns
    leads its own group, and asyncio's child watcher waits for those, so their exit status is
    never stolen.
    """
    me = os.getpid()
    reaped: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        pid = int(entry.name)
        if ppid != me or state != "Z" or pgrp == pid:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
            reaped.append(pid)
    return reaped


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# How long the members of a killed process group get to die and be reaped (bounded poll).
GROUP_EXIT_POLLS = 100
GROUP_EXIT_POLL_SECONDS = 0.02


async def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a child's group and, as subreaper, reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(GROUP_EXIT_POLLS):
        reap_orphans()
        if not group_exists(pgid):
            return
        await asyncio.sleep(GROUP_EXIT_POLL_SECONDS)  # the kernel offers no event for this


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process itself exits: asyncio's ``Process.wait()`` also waits for every
    pipe to close, which a grandchild holding them (``sh -c``, npx -> node) can delay forever."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.leader_exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.leader_exited.set()


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """Why a child ended: ``reason`` (exited, stdout_closed, line_too_long, stopped) + status."""

    reason: str
    status: int | None


class Child:
    """A running stdio server: ``send`` messages, get ``on_message`` and one ``on_exit`` call."""

    def __init__(self, settings: BridgeSettings, label: str,
                 on_message: Callable[[dict[str, Any]], None],
                 on_exit: Callable[[Child, ExitInfo], None]) -> None:
        self.settings = settings
        self.label = label
        self._on_message = on_message
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=settings.stdin_queue)
        self._tasks: list[asyncio.Task[Any]] = []
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False  # no new input: a stop is under way (ours or after EOF)
        self._stop_requested = False  # the bridge asked for the stop (not a crash)
        self._budget = SkipBudget(settings.non_json_per_minute)
        self._leader_exited = asyncio.Event()
        self.exit: ExitInfo | None = None
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self.exit is None and not self._stopping

    async def start(self) -> None:
        """Spawn the process; raises UpstreamUnavailable if it cannot be started."""
        s = self.settings
        try:
            loop = asyncio.get_running_loop()
            protocol = _ExitProtocol(loop)
            transport, _ = await loop.subprocess_exec(
                lambda: protocol, *s.argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=s.child_env(),
                cwd=s.workdir, start_new_session=True, preexec_fn=_die_with_parent)
            self._proc = asyncio.subprocess.Process(transport, protocol, loop)
            self._leader_exited = protocol.leader_exited
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot start {s.argv[0]!r}: {exc.strerror or exc}",
                                      data={"argv0": s.argv[0]}) from None
        logger.info("child started", extra={"server": s.name, "child": self.label, "pid": self._proc.pid})
        reader = asyncio.create_task(self._read_stdout())
        self._tasks = [reader, asyncio.create_task(self._read_stderr()),
                       asyncio.create_task(self._write_stdin())]
        self._monitor = asyncio.create_task(self._watch(reader))

    def send(self, message: dict[str, Any]) -> None:
        """Queue one message for stdin; raises BridgeBusy when the queue is full."""
        if not self.alive:
            raise UpstreamUnavailable("the stdio server is not running")
        try:
            self._queue.put_nowait(encode_message(message))
        except asyncio.QueueFull:
            raise BridgeBusy("the stdio server's input queue is full; retry later") from None

    async def stop(self) -> ExitInfo:
        """Stop the process and its group (idempotent); returns how it ended."""
        self._stopping = True
        self._stop_requested = True
        if self._proc is None:
            return ExitInfo("stopped", None)
        if self._monitor is not None:
            if self._proc.returncode is None:
                await self._escalate()
            await asyncio.shield(self._monitor)
        assert self.exit is not None
        return self.exit

    async def _escalate(self) -> None:
        proc = self._proc
        assert proc is not None
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # the writer closes stdin after what is queued
        if proc.stdin is not None and self._queue.full():
            proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(self._leader_exited.wait(), self.settings.stop_grace)
                return
            except TimeoutError:
                continue
        await self._leader_exited.wait()

    async def _watch(self, reader: asyncio.Task[str]) -> None:
        proc = self._proc
        assert proc is not None
        waiter = asyncio.create_task(self._leader_exited.wait())
        await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
        reason = "exited"
        if reader.done():
            reason = reader.result()
            if reason == "line_too_long":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            elif proc.returncode is None and not self._stopping:
                self._stopping = True
                await self._escalate()
        await waiter
        # Whatever the leader left in its group goes too: no orphan outlives its server (and
        # the pipes it holds close, which asyncio waits for).
        await _kill_group(proc.pid)
        await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if proc.stdin is not None:
            proc.stdin.close()
        if self._stop_requested and reason in ("exited", "stdout_closed"):
            reason = "stopped"
        self.exit = ExitInfo(reason, proc.returncode)
        self.exited.set()
        level = logging.INFO if reason == "stopped" else logging.WARNING
        logger.log(level, "child ended", extra={"server": self.settings.name, "child": self.label,
                                                "pid": proc.pid, "reason": reason,
                                                "exit_status": proc.returncode})
        self._on_exit(self, self.exit)

    async def _read_stdout(self) -> str:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        decoder = LineDecoder(self.settings.max_line_bytes)
        while True:
            chunk = await proc.stdout.read(READ_CHUNK)
            if not chunk:
                return "stdout_closed"
            try:
                lines = decoder.feed(chunk)
            except LineTooLong as exc:
                logger.error("child wrote an oversize line; stopping it",
                             extra={"server": self.settings.name, "pid": proc.pid,
                                    "reason": "upstream_protocol_error", "limit": exc.limit})
                return "line_too_long"
            for line in lines:
                try:
                    message = decode_message(line, self.settings.max_line_bytes)
                except GatewayError as exc:
                    if self._budget.allow():
                        logger.warning("skipped a stdout line that is not a JSON-RPC message",
                                       extra={"server": self.settings.name, "pid": proc.pid,
                                              "error": exc.message,
                                              "line": line[:200].decode(errors="replace")})
                    continue
                self._on_message(message)

    async def _read_stderr(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        limit = self.settings.max_stderr_line
        buffer = bytearray()
        dropping = False
        while True:
            chunk = await proc.stderr.read(READ_CHUNK)
            if not chunk:
                if buffer:
                    self._log_stderr(bytes(buffer))
                return
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > limit:
                        if not dropping:
                            self._log_stderr(bytes(buffer[:limit]), truncated=True)
                        dropping = True
                        buffer.clear()
                    break
                if not dropping:
                    self._log_stderr(bytes(buffer[:min(end, limit)]), truncated=end > limit)
                dropping = False
                del buffer[:end + 1]

    def _log_stderr(self, line: bytes, truncated: bool = False) -> None:
        text = line.rstrip(b"\r").decode("utf-8", errors="replace")
        if text.strip():
            logger.info("child stderr", extra={"server": self.settings.name, "child": self.label,
                                               "pid": self.pid, "line": text, "truncated": truncated})

    async def _write_stdin(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            while True:
                data = await self._queue.get()
                if data is None:
                    break
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
