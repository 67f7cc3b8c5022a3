"""What the inner hops' protection costs: gateway CPU per ``tools/call`` with inner TLS and the
signed caller assertion off, with the assertion on, and with both on.

    .venv/bin/python -m bench.trust_cpu [--blocks 14] [--calls 250] [--budget 15] [--work DIR]
                                        [--out FILE]

Three dev stacks run side by side, the same bench config but for two keys: (a) ``inner_tls``
off and ``identity.assertion`` off; (b) the assertion on; (c) ``inner_tls`` on and the assertion
on. One MCP session each, ``tools/call echo`` on /mcp/bench one call at a time, in rounds of one
block per stack (the order rotates every round), so that load from other jobs on the machine
falls on all three alike. Each block's CPU is read from /proc for Envoy (its restarter's process
group), ext_authz, ext_proc and the backend server (which verifies the assertion and terminates
the inner TLS). The figures are medians over the blocks; the overhead of (c) over (a) is the
median over rounds of the per-round ratio of the totals. Envoy's upstream connection and request
counters of each cluster are read at the end: connections reused (few connections, many
requests) means no TLS handshake per request. Exit status 1 when (c) costs more than
``--budget`` percent over (a) (issue 17). ``make bench`` runs it too (bench/run.py) and reports
the three rows (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import yaml

from bench.aggregate_cpu import Endpoint, _call, _open
from bench.configs import BENCH_ROLE, BENCH_TENANT, BENCH_USER, ROOT, RunContext, gateway_config_raw
from bench.procs import cpu_seconds, group_members
from gateway import eventloop

MEASURED = ("envoy", "ext_authz", "ext_proc", "backend")
# label -> (inner_tls.enabled, identity.assertion, the services' event loop: gateway.eventloop)
VARIANTS: dict[str, tuple[bool, bool, str]] = {
    "plain": (False, False, "uvloop"), "assertion": (False, True, "uvloop"),
    "inner_tls+assertion": (True, True, "uvloop"),
    "plain@asyncio": (False, False, "asyncio"),
    "inner_tls+assertion@asyncio": (True, True, "asyncio")}
WARMUP_CALLS = 60


def _config(work: Path, inner_tls: bool, assertion: bool) -> Path:
    raw = gateway_config_raw(RunContext(work))
    # The per-server path is what these stacks compare: no aggregator process beside them.
    raw.pop("aggregate", None)
    raw["secrets"] = [name for name in raw.get("secrets", []) if name != "MCP_GATEWAY_AGGREGATE_KEYS"]
    raw["inner_tls"] = {"enabled": inner_tls}
    raw["identity"] = {"assertion": assertion}
    path = work / "gateway-trust.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _pids(stack: Any) -> dict[str, list[int]]:
    """Envoy (every process of its restarter's group), ext_authz, ext_proc and the bench server."""
    pids: dict[str, list[int]] = {name: [] for name in MEASURED}
    for comp in stack.components:
        proc = stack.procs.get(comp.label)
        role = "backend" if comp.name == "bench" else comp.name
        if proc is not None and role in MEASURED:
            pids[role] += group_members(os.getpgid(proc.pid))
    return pids


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) or 0.0 for pid in group) for name, group in pids.items()}


def cluster_counters(admin: str) -> dict[str, dict[str, int]]:
    """``upstream_cx_total`` and ``upstream_rq_total`` of every cluster that saw a request."""
    url = f"{admin}/stats?filter=^cluster\\.[^.]+\\.upstream_(cx|rq)_total$"
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (loopback admin)
        text = answer.read().decode()
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        parts = name.split(".")
        if len(parts) == 3 and value.strip().isdigit():
            out.setdefault(parts[1], {})[parts[2].removeprefix("upstream_")] = int(value)
    return {k: v for k, v in out.items() if v.get("rq_total")}


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _answered(http: httpx2.Client, path: Endpoint, token: str, rid: int) -> bool:
    """One measured call; False (logged) when it was not answered with a result."""
    try:
        _call(http, path, token, rid)
    except SystemExit as exc:  # _call's refusal of anything but a 200 with a result
        print(f"trust_cpu: {exc}", file=sys.stderr)
        return False
    return True


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(work: Path, blocks: int, calls: int) -> dict[str, Any]:
    from gateway.config import load_config
    from gatewayctl import devstack

    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    labels = list(VARIANTS)
    # per label, per block: CPU seconds by process
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    # Calls not answered 200 with a result (e.g. Envoy's 503 when a check overran its timeout
    # on a starved machine): counted and reported, the run goes on (the CPU was spent).
    errors: dict[str, int] = dict.fromkeys(labels, 0)
    counters: dict[str, Any] = {}
    with contextlib.ExitStack() as stacks:
        ready = []
        for label, (inner_tls, assertion, loop) in VARIANTS.items():
            folder = work / label.replace("+", "-").replace("@", "-")
            folder.mkdir(parents=True, exist_ok=True)
            config = load_config(_config(folder, inner_tls, assertion))
            devstack.ensure_tls(config)
            # The stack's processes inherit the loop choice when they start.
            with _environ(eventloop.ENV, loop):
                stack = stacks.enter_context(devstack.running(config, startup_timeout=90.0))
            token = devstack.mint(config, sub=BENCH_USER, roles=(BENCH_ROLE,), tenant=BENCH_TENANT,
                                  ttl=3600)
            http = stacks.enter_context(httpx2.Client(
                verify=ssl.create_default_context(cafile=str(stack.ca_file)), timeout=30))
            path = Endpoint(label, f"{config.public_url.rstrip('/')}/mcp/bench", "echo")
            _open(http, path, token)
            for rid in range(1, WARMUP_CALLS + 1):  # caches, connections, the Lua VM
                _call(http, path, token, rid)
            admin = f"http://{config.admin.host}:{config.admin.port}"
            ready.append((label, http, path, token, _pids(stack), admin))
        for block in range(blocks):
            shift = block % len(ready)
            for label, http, path, token, pids, _ in ready[shift:] + ready[:shift]:
                before = _cpu(pids)
                for rid in range(calls):
                    if not _answered(http, path, token, 1000 + rid):
                        errors[label] += 1
                after = _cpu(pids)
                samples[label].append({n: after[n] - before[n] for n in MEASURED})
        for label, *_, admin in ready:
            counters[label] = cluster_counters(admin)
    by_process = {label: {n: round(_median([s[n] / calls * 1e6 for s in blocks_]), 1)
                          for n in MEASURED}
                  for label, blocks_ in samples.items()}
    totals = {label: [sum(s.values()) / calls * 1e6 for s in blocks_]
              for label, blocks_ in samples.items()}
    base = totals["plain"]

    def overhead(label: str, base: list[float] = base) -> float:
        return round((_median([t / b for t, b in zip(totals[label], base, strict=True)]) - 1) * 100, 1)

    return {"calls_per_variant": blocks * calls, "errors": errors,
            "variants": {label: {"inner_tls": t, "assertion": a, "event_loop": loop}
                         for label, (t, a, loop) in VARIANTS.items()},
            "gateway_cpu_us_per_call": {label: round(_median(v), 1) for label, v in totals.items()},
            "by_process_us_per_call": by_process,
            "overhead_percent": {
                "assertion": overhead("assertion"),
                "inner_tls+assertion": overhead("inner_tls+assertion"),
                "inner_tls+assertion@asyncio": overhead("inner_tls+assertion@asyncio",
                                                        totals["plain@asyncio"])},
            # uvloop over the standard loop, same config: the event loop lever (issue 18).
            "uvloop_saving_percent": {
                "plain": round((1 - _median([u / a for u, a in zip(
                    base, totals["plain@asyncio"], strict=True)])) * 100, 1),
                "inner_tls+assertion": round((1 - _median([u / a for u, a in zip(
                    totals["inner_tls+assertion"], totals["inner_tls+assertion@asyncio"],
                    strict=True)])) * 100, 1)},
            "envoy_clusters": counters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=14, help="blocks per variant (default 14)")
    parser.add_argument("--calls", type=int, default=250, help="calls per block (default 250)")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="allowed CPU overhead of inner TLS + assertion in percent (default 15)")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result as JSON to this file")
    ns = parser.parse_args(argv)
    if ns.blocks < 1 or ns.calls < 1:
        parser.error("--blocks and --calls must be at least 1")
    if ns.work is not None:
        ns.work.mkdir(parents=True, exist_ok=True)
        result = run(ns.work.resolve(), ns.blocks, ns.calls)
    else:
        with tempfile.TemporaryDirectory(prefix="trust-bench-") as tmp:
            result = run(Path(tmp), ns.blocks, ns.calls)
    result["budget_percent"] = ns.budget
    result["blocks"], result["calls_per_block"] = ns.blocks, ns.calls
    text = json.dumps(result, indent=2)
    if ns.out is not None:
        ns.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 1 if result["overhead_percent"]["inner_tls+assertion"] > ns.budget else 0


if __name__ == "__main__":
    sys.exit(main())
