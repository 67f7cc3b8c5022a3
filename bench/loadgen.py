"""Load from wrk (C, HTTP/1.1, TLS where the configuration has it) driven by ``wrk_mcp.lua``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.payloads import echo_arguments_json

LUA = Path(__file__).resolve().parent / "wrk_mcp.lua"
MAX_THREADS = 2  # a 2-core machine: more wrk threads only steal CPU from what is measured
PROTOCOL = "2026-07-28"


class LoadError(RuntimeError):
    """wrk is missing or did not produce its summary line."""


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadError("wrk is not installed: `sudo apt-get install wrk` (Debian/Ubuntu) or build it "
                        "from https://github.com/wg/wrk")
    return found


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    method: str
    tool: str | None
    arguments: str = "{}"
    description: str = ""
    # Who calls (a role of the gateway's policy: its token is the target's for that role) and
    # where (a key of ``Target.urls``); None: the target's default. A workload with either set
    # exercises a path of the gateway only (``gateway_only``): other configurations skip it.
    role: str | None = None
    path: str | None = None

    @property
    def gateway_only(self) -> bool:
        return self.role is not None or self.path is not None


WORKLOADS: dict[str, Workload] = {
    "echo": Workload("echo", "tools/call", "echo", echo_arguments_json(),
                     "tools/call echo, ~1 KB arguments"),
    # The same call by a role the example policy masks nothing for (admin): no masking
    # obligation, so the gateway's route leaves ext_proc off (the uninspected path).
    "echo_plain": Workload("echo_plain", "tools/call", "echo", echo_arguments_json(),
                           "tools/call echo, no masking obligation (ext_proc off)", role="admin"),
    # The same call through the aggregate endpoint /mcp (the tool named <server>__<tool>).
    "echo_aggregate": Workload("echo_aggregate", "tools/call", "bench__echo", echo_arguments_json(),
                               "tools/call bench__echo through /mcp", path="aggregate"),
    "list": Workload("list", "tools/list", None, description="tools/list"),
    "report": Workload("report", "tools/call", "report", "{}",
                       "tools/call report, 10 KB result with PII"),
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send MCP requests to one configuration."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    session: str | None = None
    protocol: str | None = PROTOCOL
    meta: dict[str, Any] | None = None  # params._meta on every request (2026-07-28 needs it)
    tool_names: dict[str, str] = field(default_factory=dict)  # workload tool -> name here
    tokens: dict[str, str] = field(default_factory=dict)  # Workload.role -> bearer token
    urls: dict[str, str] = field(default_factory=dict)  # Workload.path -> URL

    def serves(self, workload: Workload) -> bool:
        """Whether this target has the role and the path ``workload`` asks for."""
        return ((workload.role is None or workload.role in self.tokens)
                and (workload.path is None or workload.path in self.urls))


def run_wrk(target: Target, workload: Workload, *, connections: int, seconds: float,
            rate: float | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """One wrk run; returns the WRK_JSON summary plus wrk's own CPU seconds.

    ``rate``: offer that many requests per second in all (open-loop schedule) instead of as many
    as the connections can carry."""
    if not target.serves(workload):
        raise LoadError(f"{target.url} has no role {workload.role!r} / path {workload.path!r}")
    threads = max(1, min(MAX_THREADS, connections))
    tool = target.tool_names.get(workload.tool, workload.tool) if workload.tool else ""
    token = target.tokens[workload.role] if workload.role else target.token
    url = target.urls[workload.path] if workload.path else target.url
    env = {**os.environ, "MCP_METHOD": workload.method, "MCP_TOOL": tool,
           "MCP_META": json.dumps(target.meta, separators=(",", ":")) if target.meta else "",
           "MCP_ARGS": workload.arguments, "MCP_TOKEN": token or "",
           "MCP_SESSION": target.session or "", "MCP_PROTOCOL": target.protocol or "",
           "MCP_EXTRA_HEADERS": "|".join(f"{k}: {v}" for k, v in target.headers.items()),
           "MCP_THREAD_RATE": f"{rate / threads:g}" if rate else ""}
    argv = [find_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(LUA), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds + timeout_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise LoadError(f"wrk did not finish: {' '.join(argv)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    line = next((x for x in out.decode().splitlines() if x.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({proc.returncode}): {err.decode()[-800:]}{out.decode()[-800:]}")
    summary: dict[str, Any] = json.loads(line[len("WRK_JSON "):])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Only wrk is reaped in this window, so the children's usage delta is wrk's own CPU.
    summary["wrk_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    summary["stderr"] = err.decode(errors="replace")[-600:]
    return summary
