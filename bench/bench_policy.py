"""Policy benchmark (not a test): CPU per embedded-Rego decision and per visible_tools query.

    .venv/bin/python bench/bench_policy.py [--requests N] [--baseline DIR] [--no-hop]
                                           [--test-suite [--runs N] [--only-engine E]]
                                           [--test-suite-only]

Measures, in one run, the shipped ``policies/`` and optionally a baseline folder (e.g. the
previous policy), each with the input pruned to what the policy references and with the full
ext_authz input (every header, parsed_body, all claims), without the decision cache; then with
the cache (the default size), a miss (every request a distinct path, or a distinct item list)
beside a hit (the same request again). The request input carries the path facts ext_authz adds
(``input.mcp.facts``); a baseline policy that does not read them never gets them.
Then the cost of the hop to a worker thread that every miss takes in the services
(``EmbeddedEngine.evaluate``, ``gateway.policy.eval_worker``): the same misses inline on the
calling thread and through the engine, CPU and wall time per query, one at a time and 16 at once.
Prints a markdown table.

With ``--test-suite``: the wall time and peak RSS of ``mcp-gateway policy test`` on the shipped
``policies/``, each run a child process (min and median of ``--runs``), with the default engine
(OPA in-process) beside ``--engine embedded`` (rego-cpp), and the part of the wall time the
command itself reports (its closing ``[engine, N s]``: static checks, tests, sample requests);
the rest is starting Python and importing. Off by default: the rego-cpp runs take ~7 s and GBs
each (more on a loaded machine), too long for ``make bench``; ``--only-engine opa`` skips them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import DEFAULT_DECISION_CACHE_SIZE  # noqa: E402
from gateway.policy.decision import check_decision  # noqa: E402
from gateway.policy.embedded import EmbeddedEngine  # noqa: E402
from gateway.policy.facts import with_facts  # noqa: E402
from gateway.policy.rego import ALL, CompiledPolicy, load_sources  # noqa: E402

HEADERS = {
    ":method": "POST", ":path": "/mcp/files", ":authority": "gw.example.test", ":scheme": "https",
    "content-type": "application/json", "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2025-11-25", "mcp-session-id": "3f1c2d9e8b7a4c56",
    "user-agent": "claude-code/2.1", "x-request-id": "673e035f-618a-4067-b8fc-d852dcbabfb1",
    "x-forwarded-proto": "https", "content-length": "99", "x-envoy-auth-partial-body": "false",
}
ARGS = {"path": "shared/reports/q3.txt"}
CLAIMS = {"sub": "alice", "iss": "https://bench-issuer.example", "aud": "https://gw.example.test/mcp/files",
          "exp": 1999999999, "iat": 1700000000, "scope": "tools:call:files/read_file",
          "roles": ["engineer"], "tenant": "acme", "client_id": "bench", "jti": "abc"}
DECIDE_INPUT: dict[str, Any] = {
    "attributes": {"request": {"http": {"id": "1234567890", "method": "POST", "path": "/mcp/files",
                                        "host": "gw.example.test", "scheme": "https",
                                        "headers": HEADERS}},
                   "source": {"address": "10.0.0.7"}},
    "parsed_body": {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                    "params": {"name": "read_file", "arguments": ARGS}},
    # As ext_authz builds it, facts included (a policy that does not read them never gets them).
    "mcp": with_facts({"kind": "request", "method": "tools/call", "id": 7, "name": "read_file",
                       "tool": "read_file", "arguments": ARGS, "resource_uri": None, "prompt": None,
                       "protocol_version": "2025-11-25", "session_id": "3f1c2d9e8b7a4c56"}),
    "token": CLAIMS,
    "server": {"name": "files", "resource": "https://gw.example.test/mcp/files"},
    "now": 1700000001,
}
# What ext_proc sends for a tools/list page (ext_proc/inspect.py).
LIST_INPUT: dict[str, Any] = {
    "mcp": {"method": "tools/list"},
    "token": {"sub": "alice", "roles": ["engineer"], "tenant": "acme", "scope": "tools:call:files/*"},
    "server": {"name": "files"}, "kind": "tools",
    "items": ["list_directory", "stat", "read_file", "search", "write_file", "move", "delete"],
}


def per_call_us(policy: CompiledPolicy, ep: str, values: list[Any], n: int) -> float:
    """Best of three rounds of n evaluations cycling through ``values``; each round starts with
    an empty cache, so distinct values are misses and a repeated one hits from the second call."""
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        if policy.cache is not None:
            policy.cache.clear()
        batch = [values[i % len(values)] for i in range(n)]
        t = time.process_time()
        for value in batch:
            policy.evaluate(ep, value)
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def distinct_calls(n: int) -> list[dict[str, Any]]:
    """n allowed tools/call inputs that differ only in the path (each one a cache miss)."""
    out = []
    for i in range(n):
        args = {"path": f"shared/reports/q{i}.txt"}
        out.append({**DECIDE_INPUT,
                    "parsed_body": {**DECIDE_INPUT["parsed_body"],
                                    "params": {"name": "read_file", "arguments": args}},
                    "mcp": with_facts({**DECIDE_INPUT["mcp"], "arguments": args})})
    return out


def distinct_lists(n: int) -> list[dict[str, Any]]:
    """n tools/list pages that differ in one item name (each one a cache miss)."""
    return [{**LIST_INPUT, "items": [*LIST_INPUT["items"][:-1], f"tool_{i}"]} for i in range(n)]


def measure(label: str, folder: Path, n: int) -> list[tuple[str, float]]:
    sources = load_sources(folder, include_tests=False)
    entrypoints = ["mcp/authz/decision", "mcp/authz/visible_tools"]
    policy = CompiledPolicy(sources, entrypoints)
    defined, value = policy.evaluate("mcp/authz/decision", DECIDE_INPUT)
    if not check_decision(value, defined=defined).allow:
        raise SystemExit(f"{folder}: the benchmark request is not allowed: {value}")
    rows = []
    pruned = policy.input_projection
    for mode, projection in (("pruned input", pruned), ("full input", ALL)):
        policy.input_projection = projection
        rows.append((f"{label}, {mode}, no cache: allowed tools/call decision",
                     per_call_us(policy, "mcp/authz/decision", [DECIDE_INPUT], n)))
        rows.append((f"{label}, {mode}, no cache: visible_tools (7 items)",
                     per_call_us(policy, "mcp/authz/visible_tools", [LIST_INPUT], n)))
    cached = CompiledPolicy(sources, entrypoints, cache_size=DEFAULT_DECISION_CACHE_SIZE)
    if cached.cache is None:
        rows.append((f"{label}: decision cache off (the policy calls "
                     f"{', '.join(cached.cache_disabled_by)})", float("nan")))
        return rows
    calls, lists = distinct_calls(n), distinct_lists(n)
    rows.append((f"{label}, cache miss: allowed tools/call decision (distinct paths)",
                 per_call_us(cached, "mcp/authz/decision", calls, n)))
    rows.append((f"{label}, cache hit: allowed tools/call decision",
                 per_call_us(cached, "mcp/authz/decision", [DECIDE_INPUT], n)))
    rows.append((f"{label}, cache miss: visible_tools (7 items, distinct pages)",
                 per_call_us(cached, "mcp/authz/visible_tools", lists, n)))
    rows.append((f"{label}, cache hit: visible_tools (7 items)",
                 per_call_us(cached, "mcp/authz/visible_tools", [LIST_INPUT], n)))
    return rows


def hop_rows(folder: Path, n: int) -> list[tuple[str, float, float]]:
    """(measure, CPU us, wall us) per miss: inline, through the worker pool, 16 concurrent."""
    rows: list[tuple[str, float, float]] = []
    cases = (("allowed tools/call decision", "mcp/authz/decision", DECIDE_INPUT),
             ("visible_tools (7 items)", "mcp/authz/visible_tools", LIST_INPUT))

    async def run() -> None:
        # No cache: every query is a miss, the case that takes the hop.
        engine = EmbeddedEngine(folder, "mcp/authz/decision", reload_interval=0, cache_size=0,
                                extra_entrypoints=("mcp/authz/visible_tools",))
        await engine.start()
        try:
            for name, ep, value in cases:
                await engine.evaluate(ep, value)  # start the workers
                best = [(float("inf"), float("inf"))] * 3
                for _ in range(3):
                    c, w = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        engine.evaluate_sync(ep, value)
                    inline = ((time.process_time() - c) / n * 1e6, (time.perf_counter() - w) / n * 1e6)
                    c, w = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        await engine.evaluate(ep, value)
                    hop = ((time.process_time() - c) / n * 1e6, (time.perf_counter() - w) / n * 1e6)
                    c, w = time.process_time(), time.perf_counter()
                    for _ in range(n // 16):
                        await asyncio.gather(*(engine.evaluate(ep, value) for _ in range(16)))
                    m = n // 16 * 16
                    par = ((time.process_time() - c) / m * 1e6, (time.perf_counter() - w) / m * 1e6)
                    best = [min(b, x) for b, x in zip(best, (inline, hop, par), strict=True)]
                rows.append((f"miss inline on the loop (before): {name}", *best[0]))
                rows.append((f"miss on a worker thread, one at a time: {name}", *best[1]))
                rows.append((f"miss on a worker thread, 16 at once ({engine.pool.workers} workers): "
                             f"{name}", *best[2]))
            hop = (float("inf"), float("inf"))
            for _ in range(3):
                c, w = time.process_time(), time.perf_counter()
                for _ in range(n):
                    await engine.pool.run(lambda interp: None, 1.0)
                hop = min(hop, ((time.process_time() - c) / n * 1e6, (time.perf_counter() - w) / n * 1e6))
            rows.append(("the hop alone: an empty job through the worker pool", *hop))
        finally:
            await engine.close()

    asyncio.run(run())
    return rows


SUITE_ENGINES = {"opa": "default (OPA in-process)", "embedded": "--engine embedded (rego-cpp)"}
# The summary line `policy test` ends with: "... [opa, 1.02 s]".
COMMAND_TIME = re.compile(rb"\[\w+, ([0-9.]+) s\]\s*$")


def suite_run(engine: str) -> tuple[float, float, float, int]:
    """(wall seconds, seconds the command reports for its own work, peak RSS in MB, exit code)
    of one `mcp-gateway policy test` child (NaN for the command's part when it printed none)."""
    exe = Path(sys.executable).with_name("mcp-gateway")
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "policy", "test", "--dir", str(ROOT / "policies"),
                             "--engine", engine], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()  # to EOF before waiting: a full pipe would block the child
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    match = COMMAND_TIME.search(out)
    work = float(match.group(1)) if match else float("nan")
    return wall, work, usage.ru_maxrss / 1024, proc.returncode


def suite_rows(runs: int, engines: list[str]) -> list[tuple[str, float, float, float, float, float,
                                                            int]]:
    """Per engine: (label, min wall, median wall, median of the command's own part, min RSS,
    median RSS, exit code of the last)."""
    rows = []
    for engine in engines:
        samples = [suite_run(engine) for _ in range(runs)]
        walls = [w for w, _, _, _ in samples]
        works = [c for _, c, _, _ in samples]
        rss = [m for _, _, m, _ in samples]
        rows.append((SUITE_ENGINES[engine], min(walls), statistics.median(walls),
                     statistics.median(works), min(rss), statistics.median(rss), samples[-1][3]))
    return rows


def print_suite(runs: int, engines: list[str]) -> None:
    print(f"\n## `mcp-gateway policy test` on policies/ (a child process each, {runs} runs)\n")
    print("| engine | wall min | wall median | command's own part (median) | peak RSS min "
          "| peak RSS median | exit |")
    print("|---|---|---|---|---|---|---|")
    for label, wmin, wmed, work, rmin, rmed, rc in suite_rows(runs, engines):
        print(f"| {label} | {wmin:.2f} s | {wmed:.2f} s | {work:.2f} s | {rmin:.0f} MB "
              f"| {rmed:.0f} MB | {rc} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline", type=Path, help="another policy folder to measure alongside")
    parser.add_argument("--no-hop", action="store_true", help="skip the worker-thread hop rows")
    parser.add_argument("--test-suite", action="store_true",
                        help="also time `mcp-gateway policy test` on both engines (slow)")
    parser.add_argument("--test-suite-only", action="store_true",
                        help="only the `policy test` measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per engine of --test-suite")
    parser.add_argument("--only-engine", choices=sorted(SUITE_ENGINES),
                        help="time --test-suite on this engine only (default: both)")
    args = parser.parse_args()
    engines = [args.only_engine] if args.only_engine else list(SUITE_ENGINES)
    if args.test_suite_only:
        print_suite(args.runs, engines)
        return
    rows = []
    if args.baseline is not None:
        rows += measure("baseline", args.baseline, args.requests)
    rows += measure("policies/", ROOT / "policies", args.requests)
    print(f"## embedded Rego policy, CPU per query (best of 3 x {args.requests})\n")
    print("| measure | CPU |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.0f} us |")
    if not args.no_hop:
        print(f"\n## a miss inline vs on a worker thread (best of 3 x {args.requests})\n")
        print("| measure | CPU per query | wall per query |")
        print("|---|---|---|")
        for name, cpu, wall in hop_rows(ROOT / "policies", args.requests):
            print(f"| {name} | {cpu:.0f} us | {wall:.0f} us |")
    if args.test_suite:
        print_suite(args.runs, engines)


if __name__ == "__main__":
    main()
