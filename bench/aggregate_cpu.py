"""The aggregate endpoint's cost per call: gateway CPU of `tools/call bench__echo` on /mcp against
`tools/call echo` on /mcp/bench, same stack, same session kind.

    .venv/bin/python -m bench.aggregate_cpu [--blocks 12] [--calls 200] [--budget 10] [--work DIR]
                                            [--out FILE]

The dev stack runs with the bench backend and the aggregate endpoint on. The two paths alternate
in blocks (per-server, aggregate, per-server, ...) so that load from other jobs on the machine
falls on both alike; each block's CPU is read from /proc for Envoy (its restarter's process
group), ext_authz and ext_proc. Exit status 1 when the aggregate path costs more than
``--budget`` percent over the per-server path (docs/aggregate.md, "Limits"). ``make bench``
runs it too (bench/run.py) and reports both paths side by side (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml

from bench.configs import BENCH_ROLE, BENCH_TENANT, BENCH_USER, ROOT, RunContext, gateway_config_raw
from bench.procs import cpu_seconds, group_members

VERSION = "2025-11-25"
KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"
MEASURED = ("envoy", "ext_authz", "ext_proc")
ARGUMENTS = {"text": "x" * 200}


@dataclass
class Endpoint:
    """One way to call the echo tool: its URL, the tool's name there, an open session."""

    label: str
    url: str
    tool: str
    session: str = ""


def _headers(token: str, session: str = "") -> dict[str, str]:
    out = {"authorization": f"Bearer {token}", "content-type": "application/json",
           "accept": "application/json, text/event-stream", "mcp-protocol-version": VERSION}
    if session:
        out["mcp-session-id"] = session
    return out


def _open(http: httpx2.Client, path: Endpoint, token: str) -> None:
    answer = http.post(path.url, headers=_headers(token), json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": VERSION, "capabilities": {},
            "clientInfo": {"name": "aggregate-bench", "version": "1"}}})
    answer.raise_for_status()
    path.session = answer.headers["mcp-session-id"]
    http.post(path.url, headers=_headers(token, path.session),
              json={"jsonrpc": "2.0", "method": "notifications/initialized"}).raise_for_status()


def _call(http: httpx2.Client, path: Endpoint, token: str, rid: int) -> None:
    answer = http.post(path.url, headers=_headers(token, path.session), json={
        "jsonrpc": "2.0", "id": rid, "method": "tools/call",
        "params": {"name": path.tool, "arguments": ARGUMENTS}})
    if answer.status_code != 200 or '"result"' not in answer.text:
        raise SystemExit(f"{path.label}: call {rid} failed: {answer.status_code} {answer.text[:300]}")


def _gateway_pids(stack: Any) -> dict[str, list[int]]:
    """Envoy (every process of its restarter's group), ext_authz and ext_proc processes."""
    pids: dict[str, list[int]] = {name: [] for name in MEASURED}
    for comp in stack.components:
        proc = stack.procs.get(comp.label)
        if proc is not None and comp.name in MEASURED:
            pids[comp.name] += group_members(os.getpgid(proc.pid))
    return pids


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) or 0.0 for pid in group) for name, group in pids.items()}


def _config(work: Path) -> Path:
    ctx = RunContext(work)
    raw = gateway_config_raw(ctx)  # the aggregate endpoint on, as the default config has it
    if raw.get("aggregate", {}).get("session_keys") != KEYS or KEYS not in raw.get("secrets", []):
        raise SystemExit(f"the bench config has no aggregate endpoint sealing with {KEYS}")
    path = work / "gateway-aggregate.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run(work: Path, blocks: int, calls: int) -> dict[str, Any]:
    from gateway.config import load_config
    from gatewayctl import devstack

    config = load_config(_config(work))
    devstack.ensure_tls(config)
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    base = config.public_url.rstrip("/")
    paths = [Endpoint("per-server", f"{base}/mcp/bench", "echo"),
             Endpoint("aggregate", f"{base}/mcp", "bench__echo")]
    cpu = {p.label: dict.fromkeys(MEASURED, 0.0) for p in paths}
    with devstack.running(config, startup_timeout=90.0) as stack:
        token = devstack.mint(config, sub=BENCH_USER, roles=(BENCH_ROLE,), tenant=BENCH_TENANT,
                              ttl=3600)
        tls = ssl.create_default_context(cafile=str(stack.ca_file))
        pids = _gateway_pids(stack)
        with httpx2.Client(verify=tls, timeout=30) as http:
            for path in paths:
                _open(http, path, token)
                for rid in range(1, 51):  # warm-up: caches, connections, the Lua VM
                    _call(http, path, token, rid)
            for block in range(blocks):
                for path in paths if block % 2 == 0 else paths[::-1]:
                    before = _cpu(pids)
                    for rid in range(calls):
                        _call(http, path, token, 1000 + rid)
                    after = _cpu(pids)
                    for name in MEASURED:
                        cpu[path.label][name] += after[name] - before[name]
    total = blocks * calls
    per_call = {label: sum(parts.values()) / total * 1e6 for label, parts in cpu.items()}
    overhead = (per_call["aggregate"] / per_call["per-server"] - 1) * 100
    return {"calls_per_path": total,
            "gateway_cpu_us_per_call": {k: round(v, 1) for k, v in per_call.items()},
            "by_component_us_per_call": {label: {name: round(v / total * 1e6, 1)
                                                 for name, v in parts.items()}
                                         for label, parts in cpu.items()},
            "aggregate_overhead_percent": round(overhead, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12, help="blocks per path (default 12)")
    parser.add_argument("--calls", type=int, default=200, help="calls per block (default 200)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="allowed CPU overhead of /mcp in percent (default 10)")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result as JSON to this file")
    ns = parser.parse_args(argv)
    if ns.work is not None:
        ns.work.mkdir(parents=True, exist_ok=True)
        result = run(ns.work.resolve(), ns.blocks, ns.calls)
    else:
        with tempfile.TemporaryDirectory(prefix="aggregate-bench-") as tmp:
            result = run(Path(tmp), ns.blocks, ns.calls)
    result["budget_percent"] = ns.budget
    result["blocks"], result["calls_per_block"] = ns.blocks, ns.calls
    text = json.dumps(result, indent=2)
    if ns.out is not None:
        ns.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 1 if result["aggregate_overhead_percent"] > ns.budget else 0


if __name__ == "__main__":
    sys.exit(main())
