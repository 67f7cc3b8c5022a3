"""``make bench`` / ``python -m bench.run [--quick] [--only KEY,...]``: every configuration in turn.

For each configuration: start it, warm up, then for each workload and concurrency level run wrk
for a fixed time while reading CPU time and peak RSS of each of its processes from /proc. The
full gateway and Envoy-with-TLS-only also get a paced run at half of the gateway's saturation
throughput (the latency target). Then ``bench/aggregate_cpu.py`` compares ``tools/call`` through
the aggregate endpoint ``/mcp`` with ``/mcp/<server>`` (gateway CPU per call), and
``bench/trust_cpu.py`` compares ``tools/call`` with inner TLS and the signed caller assertion
off, the assertion on, and both on (gateway CPU per call). Writes
``bench/results/<timestamp>.json``, then ``docs/benchmarks.json``, ``docs/benchmarks.md``
and the charts in ``docs/benchmarks/``. ``--only aggregate,trust`` (comparisons only) puts
their results into the last full run's ``docs/benchmarks.json`` and renders the report again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.configs import CONFIGURATIONS, Configuration, RunContext, ensure_certs
from bench.loadgen import WORKLOADS, Workload, find_wrk, run_wrk
from bench.procs import Meter
from bench.profile import profile_gateway

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# The gateway runs before Envoy-only so the paced run of both can use the gateway's saturation.
ORDER = ("direct", "gateway", "gateway_grpc", "gateway_audit_interval", "envoy_tls", "contextforge",
         "contextforge_stateful")
PACED = ("gateway", "gateway_grpc", "envoy_tls")
# Variants of the full gateway measured beside it (3b: ext_authz over gRPC, 3c: audit.sync
# interval); a quick run gives them a shorter plan (Plan.variant_*).
VARIANTS = ("gateway_grpc", "gateway_audit_interval")
# Issue 3 and 5 figures: ext_authz decision CPU, Rego per query, PII masking, ext_proc exchange
# (masking and filtered tools/list), audit group commit; issue 18's in-function levers.
MICRO = ("bench_ext_authz.py", "bench_policy.py", "bench_pii.py", "bench_ext_proc.py",
         "bench_audit.py", "bench_levers.py")


@dataclass(frozen=True, slots=True)
class Plan:
    levels: tuple[int, ...]
    seconds: float
    warmup: float
    workloads: tuple[str, ...]
    cf_levels: tuple[int, ...]
    cf_seconds: float
    cf_workloads: tuple[str, ...]
    paced_connections: int
    profile_seconds: int
    profile_workloads: tuple[str, ...]
    micro_args: dict[str, list[str]]
    micro_timeout: float
    # The variants' plan; None: the same as the main configurations'.
    variant_levels: tuple[int, ...] | None = None
    variant_workloads: tuple[str, ...] | None = None
    variant_paced: bool = True
    # bench/aggregate_cpu.py: interleaved blocks of calls per path (/mcp and /mcp/<server>).
    aggregate_blocks: int = 12
    aggregate_calls: int = 200
    aggregate_timeout: float = 300
    # bench/trust_cpu.py: interleaved blocks of calls per variant (inner TLS / assertion off, on).
    trust_blocks: int = 14
    trust_calls: int = 250
    trust_timeout: float = 700


# echo_plain and echo_aggregate run on the gateway configurations only (bench.loadgen.Workload).
FULL = Plan(levels=(1, 4, 16, 64), seconds=8, warmup=2,
            workloads=("echo", "echo_plain", "list", "report", "echo_aggregate"),
            cf_levels=(1, 4), cf_seconds=6, cf_workloads=("echo", "list", "report"),
            paced_connections=16, profile_seconds=10,
            profile_workloads=("echo", "echo_plain", "report"),
            micro_args={}, micro_timeout=120, variant_workloads=("echo", "echo_plain"))
QUICK = Plan(levels=(1, 16), seconds=3, warmup=1,
             workloads=("echo", "echo_plain", "list", "report", "echo_aggregate"),
             cf_levels=(4,), cf_seconds=3, cf_workloads=("echo",), paced_connections=16,
             profile_seconds=4, profile_workloads=("echo",),
             micro_args={"bench_ext_authz.py": ["--requests", "1000"],
                         "bench_policy.py": ["--requests", "300"],
                         "bench_pii.py": ["--repeat", "3"],
                         "bench_ext_proc.py": ["--requests", "150"],
                         "bench_audit.py": ["--entries", "2000", "--concurrency", "1,64"],
                         "bench_levers.py": ["--calls", "200", "--rounds", "4"]},
             micro_timeout=40, variant_levels=(16,), variant_workloads=("echo", "echo_plain"),
             variant_paced=False, aggregate_blocks=4, aggregate_calls=100, aggregate_timeout=150,
             trust_blocks=4, trust_calls=100, trust_timeout=200)


def measure(conf: Configuration, workload: Workload, connections: int, seconds: float,
            rate: float | None = None) -> dict[str, Any]:
    meter = Meter(conf.roles)
    meter.start()
    res = run_wrk(conf.target(), workload, connections=connections, seconds=seconds,
                  rate=rate)
    usage = meter.stop()
    ok = int(res["ok"])
    duration = res["duration_us"] / 1e6
    errors = int(res["bad"]) + sum(int(res[k]) for k in (
        "errors_connect", "errors_read", "errors_write", "errors_timeout"))
    rec: dict[str, Any] = {
        "workload": workload.name, "connections": connections,
        "paced_rps": round(rate, 1) if rate else None,
        "seconds": round(duration, 2), "requests": res["requests"], "ok": ok, "errors": errors,
        "rps": round(ok / duration, 1) if duration else 0.0,
        "p50_ms": res["p50_us"] / 1000, "p90_ms": res["p90_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000, "p999_ms": res["p999_us"] / 1000,
        "mean_ms": round(res["lat_mean_us"] / 1000, 3), "max_ms": res["lat_max_us"] / 1000,
        "cdf_ms": [[q, us / 1000] for q, us in res["cdf"]],
        "wrk_cpu_s": res["wrk_cpu_s"],
        "processes": {role: {**u, "cpu_us_per_req": round(u["cpu_s"] / ok * 1e6, 1) if ok else None}
                      for role, u in usage.items()},
    }
    if errors:
        rec["error_sample"] = res["stderr"]
    print(f"    {workload.name:<7} c={connections:<3} {rec['rps']:>9.1f} req/s  p50 {rec['p50_ms']:8.2f} ms"
          f"  p99 {rec['p99_ms']:8.2f} ms  errors {errors}"
          + (f"  (paced at {rate:.0f} req/s)" if rate else ""), flush=True)
    return rec


def run_configuration(conf: Configuration, plan: Plan, half: dict[str, Any]) -> dict[str, Any]:
    is_cf = conf.key.startswith("contextforge")
    variant = conf.key in VARIANTS
    levels = plan.cf_levels if is_cf else plan.levels
    seconds = plan.cf_seconds if is_cf else plan.seconds
    workloads = plan.cf_workloads if is_cf else plan.workloads
    if variant:
        levels = plan.variant_levels or levels
        workloads = plan.variant_workloads or workloads
    out: dict[str, Any] = {"key": conf.key, "title": conf.title, "tls": conf.tls,
                           "python_roles": list(conf.python_roles), "runs": []}
    print(f"== {conf.title}", flush=True)
    started = time.monotonic()
    try:
        conf.start()
        out["startup_s"] = round(time.monotonic() - started, 1)
        out["facts"] = conf.facts()
        for name in workloads:
            if not conf.target().serves(WORKLOADS[name]):
                continue  # a path of the gateway only (another role or endpoint)
            # Warm-up: connections, caches, JIT-free Python's lazy imports; not recorded.
            run_wrk(conf.target(), WORKLOADS[name], connections=min(4, max(levels)),
                    seconds=plan.warmup)
            for c in levels:
                out["runs"].append(measure(conf, WORKLOADS[name], c, seconds))
        if conf.key in PACED and (plan.variant_paced or not variant):
            if "rate" not in half:
                peak = max((r["rps"] for r in out["runs"] if r["workload"] == "echo"), default=0.0)
                if peak > 0:
                    half["rate"] = peak / 2
                    half["from"] = conf.key
            if "rate" in half:
                # The same offered rate for both (wrk's clock schedule, not a closed loop), so
                # the latency difference is the gateway's, not a difference in load.
                rec = measure(conf, WORKLOADS["echo"], plan.paced_connections, seconds,
                              rate=half["rate"])
                rec["paced_target_rps"] = round(half["rate"], 1)
                out["paced"] = rec
        out["final"] = {role: {"procs": len(pids)} for role, pids in conf.roles().items()}
    except Exception as exc:  # one configuration failing must not lose the others' numbers
        logger.exception("configuration %s failed", conf.key)
        out["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  !! {conf.key} failed: {out['failed'][:500]}", flush=True)
    finally:
        conf.stop()
    return out


def run_profile(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    try:
        return profile_gateway(ctx, seconds=plan.profile_seconds, connections=8,
                               workloads=plan.profile_workloads)
    except Exception as exc:  # the profile is an extra: its failure must not lose the run
        logger.exception("profile failed")
        return {"failed": f"{type(exc).__name__}: {exc}"[:1000]}


def run_aggregate(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    """``tools/call`` through /mcp against /mcp/<server>: bench/aggregate_cpu.py on a stack of its
    own; its result (exit status 1 = over its budget, still a result), or why there is none."""
    print("== aggregate endpoint: tools/call on /mcp against /mcp/bench", flush=True)
    out = ctx.work / "aggregate.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.aggregate_cpu", "--blocks", str(plan.aggregate_blocks),
             "--calls", str(plan.aggregate_calls), "--work", str(ctx.work / "aggregate"),
             "--out", str(out)],
            capture_output=True, text=True, timeout=plan.aggregate_timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {plan.aggregate_timeout:g} s"}
    if proc.returncode not in (0, 1) or not out.exists():
        return {"failed": f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-1000:]}"}
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    print(f"    gateway CPU per call: /mcp/bench {result['gateway_cpu_us_per_call']['per-server']:.0f} us,"
          f" /mcp {result['gateway_cpu_us_per_call']['aggregate']:.0f} us"
          f" ({result['aggregate_overhead_percent']:+.1f} %)", flush=True)
    return result


def run_trust(ctx: RunContext, plan: Plan, stamp: str) -> dict[str, Any]:
    """``tools/call`` with inner TLS and the caller assertion off, the assertion on, both on:
    bench/trust_cpu.py on three stacks of its own; its result (exit status 1 = over its budget,
    still a result), or why there is none."""
    print("== inner TLS and caller assertion: tools/call with them off and on", flush=True)
    out = ctx.work / "trust.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.trust_cpu", "--blocks", str(plan.trust_blocks),
             "--calls", str(plan.trust_calls), "--work", str(ctx.work / "trust"), "--out", str(out)],
            capture_output=True, text=True, timeout=plan.trust_timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {plan.trust_timeout:g} s"}
    if proc.returncode not in (0, 1) or not out.exists():
        return {"failed": f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-1000:]}"}
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    result["measured_at"] = stamp
    cpu = result["gateway_cpu_us_per_call"]
    print("    gateway CPU per call: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items())
          + f" ({result['overhead_percent']['inner_tls+assertion']:+.1f} %)", flush=True)
    return result


def run_micro(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for script in MICRO:
        path = ROOT / "bench" / script
        if not path.exists():
            continue
        print(f"== micro-benchmark {script}", flush=True)
        try:
            proc = subprocess.run([sys.executable, str(path), *plan.micro_args.get(script, [])],
                                  capture_output=True, text=True, timeout=plan.micro_timeout,
                                  cwd=ROOT, check=False)
        except subprocess.TimeoutExpired:
            out[script] = {"failed": f"timed out after {plan.micro_timeout:g} s"}
            continue
        out[script] = {"returncode": proc.returncode, "stdout": proc.stdout[-6000:],
                       "stderr": proc.stderr[-1500:] if proc.returncode else ""}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 3 min)")
    parser.add_argument("--only", help=f"comma-separated configurations of {', '.join(ORDER)}, "
                        "aggregate (/mcp against /mcp/<server>), trust (inner TLS and the "
                        "caller assertion off and on)")
    parser.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the py-spy profile of the full gateway")
    parser.add_argument("--no-docs", action="store_true",
                        help="write only bench/results/, not docs/benchmarks*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    plan = QUICK if args.quick else FULL
    keys = [k for k in ORDER if not args.only or k in args.only.split(",")]
    aggregate = not args.only or "aggregate" in args.only.split(",")
    trust = not args.only or "trust" in args.only.split(",")
    find_wrk()

    # SIGTERM (e.g. from make's parent) unwinds like Ctrl-C so every `finally` stops its processes.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = ROOT / ".bench" / f"run-{stamp}"
    work.mkdir(parents=True)
    (ROOT / ".bench" / ".gitignore").write_text("*\n")
    ctx = RunContext(work)
    ensure_certs(ctx)
    began = time.monotonic()
    result: dict[str, Any] = {
        "started": stamp, "mode": "quick" if args.quick else "full", "plan": asdict(plan),
        "machine": report.machine_facts(), "configurations": [], "workloads": {
            k: {"method": w.method, "tool": w.tool, "description": w.description,
                "argument_bytes": len(w.arguments)} for k, w in WORKLOADS.items()}}
    half: dict[str, Any] = {}
    try:
        for key in keys:
            result["configurations"].append(run_configuration(CONFIGURATIONS[key](ctx), plan, half))
        result["half_saturation"] = half
        if "gateway" in keys and not args.no_profile:
            print("== py-spy profile of the full gateway", flush=True)
            result["profile"] = run_profile(ctx, plan)
        if aggregate:
            result["aggregate"] = run_aggregate(ctx, plan)
        if trust:
            result["trust"] = run_trust(ctx, plan, stamp)
        if not args.no_micro:
            result["micro"] = run_micro(plan)
    except KeyboardInterrupt:
        print("\ninterrupted: every started process was stopped", file=sys.stderr)
        return 130
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    raw = results_dir / f"{stamp}.json"
    raw.write_text(json.dumps(result, indent=1))
    print(f"raw results: {raw}")
    if not args.no_docs and not keys and (ROOT / "docs" / "benchmarks.json").exists():
        # Comparisons only (--only aggregate,trust): into the last full run's report.
        md = report.merge_docs(result, ROOT / "docs", ("aggregate", "trust", "micro"))
        print(f"report: {md} (the comparisons of this run, the rest from the last full run)")
    elif not args.no_docs:
        md = report.write_docs(result, ROOT / "docs")
        print(f"report: {md}")
    print(report.targets_text(result))
    print(f"elapsed {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
