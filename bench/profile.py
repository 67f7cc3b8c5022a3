"""Where the full gateway's Python CPU goes per request (not a test): py-spy under wrk load.

    .venv/bin/python -m bench.profile [--seconds 15] [--connections 8] [--workloads echo,report]

Starts configuration 3 (``bench.configs.FullGateway``), and for each workload runs wrk while
py-spy samples one ext_authz and one ext_proc instance and the backend (``--nonblocking``: the target is never
paused). The CPU per request of each role comes from /proc (as in ``bench.run``); the profile
splits it into buckets (gRPC, JWT, policy, audit, ...) by the share of on-CPU samples whose stack
passes through each bucket's code. Writes flame graphs and collapsed stacks to
``.bench/profile-<stamp>/profile/`` and prints a markdown table per workload. ``bench.run``
calls :func:`profile_gateway` too, so docs/benchmarks.md carries the same breakdown.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.configs import FullGateway, RunContext, ensure_certs
from bench.loadgen import WORKLOADS, run_wrk
from bench.procs import CLK_TCK, Meter

ROOT = Path(__file__).resolve().parent.parent
RATE = 250  # samples per second per profiled process
# py-spy's idle detection does not work here (threads blocked in epoll_wait or a queue get are
# sampled as busy, paused or not), so the targets are never paused and only the event-loop
# thread's samples are used, minus those waiting in the selector; per-thread CPU comes from /proc.
IDLE_LEAVES = ("selectors.py", "concurrent/futures/thread.py", "threading.py")
# Buckets, first match wins, checked from the innermost frame outwards so that e.g. JSON parsing
# inside the policy counts as policy. Each entry: bucket -> substrings of "function (file)".
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("policy (Rego eval + input)", ("gateway/policy/", "regopy", "rego")),
    ("caller assertion (mint / verify)", ("gateway/assertion.py", "gateway/caller.py")),
    ("JWT verify", ("ext_authz/jwt.py", "jwt/", "cryptography")),
    ("audit / decision log", ("decision_log.py", "audit")),
    ("catalog / argument checks", ("ext_authz/catalog.py", "fastjsonschema", "jsonschema")),
    ("PII inspection", ("ext_proc/inspect.py",)),
    ("JSON-RPC / MCP parse", ("gateway/jsonrpc.py", "gateway/mcp.py", "orjson")),
    ("rate limit", ("ratelimit.py",)),
    ("logging / metrics / tracing", ("logging/", "prometheus_client", "opentelemetry")),
    ("request / response build", ("ext_authz/request.py", "ext_authz/response.py",
                                  "ext_proc/response.py", "ext_proc/metadata.py",
                                  "ext_authz/http_front.py")),
    ("servicer (incl. awaiting gRPC stream reads)", ("ext_authz/servicer.py",
                                                   "ext_proc/servicer.py")),
    ("protobuf (de)serialise", ("google/protobuf", "_pb2")),
    ("MCP server (request flow, tool)", ("mcp_servers/", "bench/backend.py")),
    ("aiohttp (HTTP transport)", ("aiohttp/", "aiohttp\\", "multidict", "yarl")),
    ("grpc.aio + asyncio", ("grpc/", "grpc\\", "asyncio/", "cygrpc", "_cython")),
)


def bucket_of(stack: Sequence[str]) -> str:
    for frame in reversed(stack):
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def read_collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy ``--format raw``: ``frame;frame;... count`` per line (outermost frame first)."""
    out: Counter[tuple[str, ...]] = Counter()
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[tuple(stack.split(";"))] += int(count)
    return out


def summarise(stacks: Counter[tuple[str, ...]], top: int = 12) -> dict[str, Any]:
    """Buckets of the event-loop thread's busy samples (selector waits counted apart)."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    idle = 0
    for stack, n in stacks.items():
        # asyncio's loop runs in ``run_forever``; uvloop's is C, so its thread's stacks start at
        # ``Runner.run`` and go straight to the callback.
        if not any("run_forever" in f or "Runner.run" in f for f in stack):
            continue  # other threads: their CPU is read from /proc per thread
        # Waiting: in the selector (asyncio), or inside uvloop's C loop (no Python frame below).
        if any(x in stack[-1] for x in IDLE_LEAVES) or "Runner.run" in stack[-1]:
            idle += n
            continue
        buckets[bucket_of(stack)] += n
        leaves[stack[-1]] += n
    return {"samples": sum(buckets.values()), "idle": idle, "buckets": buckets.most_common(),
            "self": leaves.most_common(top)}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (from /proc/<pid>/task/<tid>/stat)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id (``py-spy dump``); threads without Python frames
    (gRPC core's own threads) are missing."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = subprocess.run([pyspy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
    names: dict[int, str] = {}
    for line in out.splitlines():
        m = re.match(r'Thread (\d+) \((?:idle|active)\)(?:: "(.*)")?', line)
        if m:
            name = m.group(2) or "?"
            if "_poll_wrapper" in name:
                name = "gRPC completion-queue poller"
            elif "serve_forever" in name:
                name = "metrics HTTP server"
            names[int(m.group(1))] = name
    return names


def spy(pid: int, out: Path, seconds: int, fmt: str) -> subprocess.Popen[bytes]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(seconds),
                             "--rate", str(RATE), "--nonblocking", "--format", fmt,
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def breakdown(role: str, per_req: float, stacks: Counter[tuple[str, ...]], pid: int,
              names: dict[int, str], cpu: dict[int, float]) -> list[dict[str, Any]]:
    """Rows (where, share of the role's CPU, us/request): /proc per thread, the event-loop
    thread split further by its py-spy buckets."""
    s = summarise(stacks)
    total = sum(cpu.values()) or 1.0
    groups: dict[str, float] = {}
    for tid, c in cpu.items():
        label = LOOP if tid == pid else names.get(tid, "gRPC core threads (no Python frames)")
        label = re.sub(r"_\d+$", "", label)  # executor threads: audit-io_0 -> audit-io
        groups[label] = groups.get(label, 0.0) + c / total
    rows: list[dict[str, Any]] = []
    busy = s["samples"] or 1
    for label, share in sorted(groups.items(), key=lambda kv: -kv[1]):
        if label == LOOP:
            rows += [{"where": f"loop: {bucket}", "share": n / busy * share,
                      "us": n / busy * share * per_req} for bucket, n in s["buckets"]]
        else:
            rows.append({"where": f"thread: {label}", "share": share, "us": share * per_req})
    return [r for r in rows if r["share"] >= 0.005]


LOOP = "event loop (main thread)"


def profile_gateway(ctx: RunContext, *, seconds: int, connections: int,
                    workloads: Sequence[str]) -> dict[str, Any]:
    """Configuration 3 under wrk load with py-spy on one ext_authz, one ext_proc instance and the
    backend (the MCP server behind the gateway)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return {"failed": "py-spy is not installed (pip install -r requirements/bench.txt)"}
    work = ctx.work / "profile"
    work.mkdir(parents=True, exist_ok=True)
    conf = FullGateway(ctx)
    out: dict[str, Any] = {"seconds": seconds, "connections": connections, "rate_hz": RATE,
                           "files": str(work), "workloads": {}}
    try:
        conf.start()
        roles = conf.roles()
        targets = {role: roles[role][0] for role in ("ext_authz", "ext_proc", "backend")
                   if roles.get(role)}
        for name in workloads:
            workload = WORKLOADS[name]
            run_wrk(conf.target(), workload, connections=4, seconds=2)  # warm-up
            spies = []
            for role, pid in targets.items():
                for fmt in ("raw", "flamegraph"):
                    path = work / f"{name}-{role}.{'txt' if fmt == 'raw' else 'svg'}"
                    spies.append((role, fmt, path, spy(pid, path, seconds, fmt)))
            names = {pid: thread_names(pid) for pid in targets.values()}
            before = {pid: thread_cpu(pid) for pid in targets.values()}
            meter = Meter(conf.roles)
            meter.start()
            # py-spy samples in its own processes while wrk runs here.
            result = run_wrk(conf.target(), workload, connections=connections, seconds=seconds)
            usage = meter.stop()
            after = {pid: thread_cpu(pid) for pid in targets.values()}
            for _, _, _, proc in spies:
                finish(proc, 30)
            ok = int(result["ok"])
            secs = result["duration_us"] / 1e6
            rec: dict[str, Any] = {
                "ok": ok, "bad": result["bad"], "rps": round(ok / secs, 1) if secs else 0.0,
                "p50_ms": result["p50_us"] / 1000,
                "cpu_us_per_req": {role: round(u["cpu_s"] / ok * 1e6) if ok else None
                                   for role, u in usage.items()},
                "roles": {}}
            for role, fmt, path, _ in spies:
                if fmt != "raw" or not ok:
                    continue
                pid = targets[role]
                stacks = read_collapsed(path)
                cpu = {tid: after[pid].get(tid, 0.0) - before[pid].get(tid, 0.0)
                       for tid in after[pid]}
                per_req = usage[role]["cpu_s"] / ok * 1e6
                s = summarise(stacks)
                rec["roles"][role] = {
                    "cpu_us_per_req": round(per_req), "busy_samples": s["samples"],
                    "rows": breakdown(role, per_req, stacks, pid, names[pid], cpu),
                    "top_self": [[f, round(n / max(s["samples"], 1), 3)] for f, n in s["self"][:8]]}
            out["workloads"][name] = rec
    finally:
        conf.stop()
    return out


def markdown(prof: dict[str, Any]) -> list[str]:
    if prof.get("failed"):
        return [f"profile not taken: {prof['failed']}"]
    lines = [f"py-spy at {prof['rate_hz']} Hz (non-blocking) on one ext_authz, one ext_proc and the backend "
             f"instance of configuration 3, wrk with {prof['connections']} connections for "
             f"{prof['seconds']} s per workload. CPU per request of each role from /proc; split per "
             "thread from /proc/<pid>/task, and the event-loop thread further by the share of its "
             "busy samples whose innermost recognised frame is in each area (samples waiting in "
             "the selector are left out: py-spy's idle detection does not work here). Flame graphs: "
             f"`{Path(prof['files']).name}/` of the run folder.", ""]
    for name, rec in prof["workloads"].items():
        cpu = ", ".join(f"{r} {us} us" for r, us in rec["cpu_us_per_req"].items() if us)
        lines += [f"**{name}**: {rec['rps']:.0f} req/s, p50 {rec['p50_ms']:.1f} ms, CPU per "
                  f"request: {cpu}.", ""]
        for role, data in rec["roles"].items():
            lines += [f"| {name}: {role} ({data['cpu_us_per_req']} us/request) | share | us/request |",
                      "|---|---:|---:|"]
            lines += [f"| {r['where']} | {r['share']:.0%} | {r['us']:.0f} |" for r in data["rows"]]
            lines += ["", "top self frames of the loop: " + "; ".join(
                f"`{f}` {share:.0%}" for f, share in data["top_self"][:6]), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workloads", default="echo,report")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = ROOT / ".bench" / f"profile-{stamp}"
    work.mkdir(parents=True)
    (ROOT / ".bench" / ".gitignore").write_text("*\n")
    ctx = RunContext(work)
    ensure_certs(ctx)
    prof = profile_gateway(ctx, seconds=args.seconds, connections=args.connections,
                           workloads=args.workloads.split(","))
    print("\n".join(markdown(prof)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
