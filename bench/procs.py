"""Processes the harness starts, and what the kernel says each one costs.

Every child leads its own process group (``start_new_session``) so that stopping it also stops
whatever it forked (ContextForge's workers outlive their parent otherwise). Children also get
SIGTERM from the kernel if the harness dies (``PR_SET_PDEATHSIG``). :class:`ProcessSet` stops
them newest first, by group, SIGKILL after a grace period, and checks that no group member is
left.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses); index 0 is state.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one live process (not its children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return sorted(out)


def peak_rss_kb(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Child:
    role: str  # what the process is in its configuration: "backend", "envoy", "ext_authz", ...
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The child and everything it forked that is still alive."""
        return group_members(self.proc.pid) if self.proc.poll() is None else []

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("  | " + line for line in text)


@dataclass
class ProcessSet:
    """The children of one configuration; a context manager that always stops them."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)
    # Processes started by someone else (the dev stack) that count toward this configuration.
    adopted: list[tuple[str, int]] = field(default_factory=list)

    def start(self, role: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, name: str | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name or role}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=dict(env or os.environ),
                                    cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(role, proc, log)
        self.children.append(child)
        logger.debug("started %s pid %d: %s", role, proc.pid, " ".join(argv))
        return child

    def adopt(self, role: str, pid: int) -> None:
        self.adopted.append((role, pid))

    def roles(self) -> dict[str, list[int]]:
        """role -> live PIDs (children with their descendants, and adopted processes)."""
        out: dict[str, list[int]] = {}
        for child in self.children:
            out.setdefault(child.role, []).extend(child.pids())
        for role, pid in self.adopted:
            out.setdefault(role, []).extend(group_members(pid) or [pid])
        return out

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in self.children:
            while group_members(child.pid) and time.monotonic() < deadline:
                child.proc.poll()
                time.sleep(0.05)
            if group_members(child.pid):
                logger.warning("%s (pgid %d) ignored SIGTERM; sending SIGKILL", child.role, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=STOP_GRACE_SECONDS)
        left = [(c.role, pid) for c in self.children for pid in group_members(c.pid)]
        if left:
            raise RuntimeError(f"processes left after stop: {left}")
        self.children.clear()

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               alive: Callable[[], bool] | None = None, detail: Callable[[], str] | None = None,
               interval: float = 0.1) -> None:
    """Poll ``check`` until true; fail early if ``alive`` turns false, or at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited\n{detail() if detail else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:g} s\n{detail() if detail else ''}")
        time.sleep(interval)


def http_ok(url: str, *, timeout: float = 1.0, context: object = None) -> bool:
    """A GET that answers 200 (TLS verification off: loopback liveness only)."""
    import ssl
    ctx = context if isinstance(context, ssl.SSLContext) else ssl._create_unverified_context()  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def free_port() -> int:
    """A currently free loopback port (the configurations need fixed ports in their configs)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Meter:
    """CPU seconds and peak RSS of every process of a configuration over a window."""

    def __init__(self, roles: Callable[[], dict[str, list[int]]]) -> None:
        self._roles = roles
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = {pid: cpu for pids in self._roles().values() for pid in pids
                        if (cpu := cpu_seconds(pid)) is not None}

    def stop(self) -> dict[str, dict[str, float]]:
        """role -> {cpu_s, procs, peak_rss_mb (largest single process)}."""
        out: dict[str, dict[str, float]] = {}
        for role, pids in self._roles().items():
            cpu = 0.0
            rss = 0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None:
                    cpu += now - self._before.get(pid, 0.0)  # new in the window: all of it
                rss = max(rss, peak_rss_kb(pid) or 0)
            out[role] = {"cpu_s": round(cpu, 4), "procs": len(pids), "peak_rss_mb": round(rss / 1024, 1)}
        return out
