"""Turn one run's raw results into ``docs/benchmarks.md``, its charts and the targets verdict."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

RSS_LIMIT_MB = 150.0
# Issue 18's targets: the uninspected path against the backend called directly, the inspected
# one against Envoy with TLS only, ContextForge's better mode, CPU per call by process.
TARGET_UNINSPECTED_RATIO = 0.6
TARGET_UNINSPECTED_ADDED_P50_MS = 1.5
TARGET_INSPECTED_RATIO = 0.45
TARGET_INSPECTED_ADDED_P50_MS = 3.0
TARGET_VS_CF = 25.0
TARGET_CPU_US = {"ext_authz": 450.0, "ext_proc": 600.0, "envoy": 450.0}
TARGET_AGGREGATE_OVERHEAD = 10.0  # percent of gateway CPU per tools/call (docs/aggregate.md)
TARGET_TRUST_OVERHEAD = 15.0  # percent: inner TLS + caller assertion (docs/inner-tls.md, identity.md)
COLORS = {"direct": "#555555", "envoy_tls": "#1f77b4", "gateway": "#d62728", "gateway_grpc": "#ff7f0e",
          "gateway_audit_interval": "#8c564b",
          "contextforge": "#9467bd", "contextforge_stateful": "#2ca02c"}


def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    except OSError:
        pass
    envoy = ""
    try:
        from gatewayctl import envoy_config
        envoy = subprocess.run([str(envoy_config.find_envoy()), "--version"], capture_output=True,
                               text=True, timeout=30, check=False).stdout
        found = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
        envoy = found.group(1) if found else envoy.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "envoy": envoy,
            "loadavg_at_start": os.getloadavg()}


# --------------------------------------------------------------------------------- helpers

def _confs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["key"]: c for c in result["configurations"]}


def _runs(conf: dict[str, Any] | None, workload: str) -> list[dict[str, Any]]:
    if conf is None:
        return []
    return [r for r in conf.get("runs", []) if r["workload"] == workload]


def _peak(conf: dict[str, Any] | None, workload: str = "echo") -> dict[str, Any] | None:
    runs = _runs(conf, workload)
    return max(runs, key=lambda r: r["rps"]) if runs else None


def _at(conf: dict[str, Any] | None, workload: str, connections: int) -> dict[str, Any] | None:
    return next((r for r in _runs(conf, workload) if r["connections"] == connections), None)


def _cpu_total(run: dict[str, Any]) -> float:
    return sum(p["cpu_us_per_req"] or 0.0 for p in run["processes"].values())


def _bound(run: dict[str, Any], cpus: int) -> str:
    parts = sorted(((role, p["cpu_us_per_req"] or 0.0) for role, p in run["processes"].items()),
                   key=lambda x: -x[1])
    total = _cpu_total(run) + run["wrk_cpu_s"] / max(run["ok"], 1) * 1e6
    detail = ", ".join(f"{role} {us:.0f} us" for role, us in parts)
    return (f"CPU per request {_cpu_total(run):.0f} us ({detail}) plus wrk "
            f"{run['wrk_cpu_s'] / max(run['ok'], 1) * 1e6:.0f} us on {cpus} shared cores: at most "
            f"~{cpus * 1e6 / total:.0f} req/s if the cores did nothing else")


def _profile_summary(result: dict[str, Any]) -> str:
    """The largest CPU areas per Python service from the py-spy profile (tools/call echo)."""
    rec = (result.get("profile") or {}).get("workloads", {}).get("echo")
    if not rec:
        return ""
    parts = []
    for role, data in rec["roles"].items():
        top = sorted(data["rows"], key=lambda r: -r["us"])[:3]
        parts.append(f"{role} {data['cpu_us_per_req']} us = " + ", ".join(
            f"{r['where'].split(': ', 1)[-1]} {r['us']:.0f}" for r in top) + ", ...")
    return "; profile (us/request): " + "; ".join(parts)


# --------------------------------------------------------------------------------- targets

def _ratio_row(target: str, gw: dict[str, Any] | None, gw_workload: str,
               base: dict[str, Any] | None, base_workload: str, floor: float,
               added_limit_ms: float, cpus: int, why: str) -> dict[str, Any]:
    """A path's throughput against a baseline's at saturation (peak over the connection levels),
    and the p50 it adds at one connection."""
    row: dict[str, Any] = {"target": target}
    g, b = _peak(gw, gw_workload), _peak(base, base_workload)
    g1, b1 = _at(gw, gw_workload, 1), _at(base, base_workload, 1)
    if g is not None and g["rps"] == 0:
        row.update(value="0 OK responses", met=False,
                   bound="the gateway answered no request OK; first errors: "
                         + (g.get("error_sample") or "")[:200].replace("\n", " ").replace("|", "/"))
        return row
    if g is None or b is None or not b["rps"]:
        row.update(value="not measured", met=None, bound=why)
        return row
    ratio = g["rps"] / b["rps"]
    added = g1["p50_ms"] - b1["p50_ms"] if g1 and b1 else None
    met = ratio >= floor and added is not None and added <= added_limit_ms
    row.update(value=f"{ratio:.2f}x ({g['rps']:.0f} vs {b['rps']:.0f} req/s); "
                     + (f"+{added:.2f} ms p50 at c=1 ({g1['p50_ms']:.2f} vs {b1['p50_ms']:.2f} ms)"
                        if added is not None and g1 and b1 else "c=1 not measured"),
               met=met, bound="" if met else _bound(g, cpus))
    return row


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 18 (and the comparisons' budgets) as measured in this run: value,
    met (True/False/None), bound."""
    confs = _confs(result)
    cpus = int(result["machine"].get("cpus") or 2)
    gw, envoy, direct = confs.get("gateway"), confs.get("envoy_tls"), confs.get("direct")
    rows: list[dict[str, Any]] = []
    gw_peak = _peak(gw)

    rows.append(_ratio_row(
        f"uninspected tools/call (no masking obligation) >= {TARGET_UNINSPECTED_RATIO}x direct "
        f"(one backend instance each), added p50 at c=1 <= {TARGET_UNINSPECTED_ADDED_P50_MS:g} ms",
        gw, "echo_plain", direct, "echo", TARGET_UNINSPECTED_RATIO,
        TARGET_UNINSPECTED_ADDED_P50_MS, cpus, _missing(confs, "gateway", "direct")))
    interval = confs.get("gateway_audit_interval")
    fast, fast1, d1 = _peak(interval, "echo_plain"), _at(interval, "echo_plain", 1), _at(direct, "echo", 1)
    d_peak = _peak(direct)
    if fast and fast1 and d1 and d_peak and d_peak["rps"]:
        rows[-1]["value"] += (f"; with `audit.sync: interval` (no fsync on the path): "
                              f"{fast['rps'] / d_peak['rps']:.2f}x, "
                              f"+{fast1['p50_ms'] - d1['p50_ms']:.2f} ms p50 at c=1")
    rows.append(_ratio_row(
        f"inspected tools/call (masking) >= {TARGET_INSPECTED_RATIO}x Envoy-TLS-only, added p50 at "
        f"c=1 <= {TARGET_INSPECTED_ADDED_P50_MS:g} ms",
        gw, "echo", envoy, "echo", TARGET_INSPECTED_RATIO, TARGET_INSPECTED_ADDED_P50_MS,
        cpus, _missing(confs, "gateway", "envoy_tls")))

    cfs = [c for k, c in confs.items() if k.startswith("contextforge") and _peak(c)]
    row: dict[str, Any] = {"target": f">= {TARGET_VS_CF:g}x ContextForge's throughput (better mode) on "
                                     "the same tools/call (ours inspected), lower p99"}
    if gw_peak and cfs:
        best = max(cfs, key=lambda c: _peak(c)["rps"])  # type: ignore[index]
        best_peak = _peak(best)
        assert best_peak is not None
        ratio = gw_peak["rps"] / best_peak["rps"] if best_peak["rps"] else float("inf")
        # Ours at the same concurrency, else the nearest higher one (never flatters us).
        same = _at(gw, "echo", best_peak["connections"]) or min(
            (r for r in _runs(gw, "echo") if r["connections"] >= best_peak["connections"]),
            key=lambda r: r["connections"], default=None)
        p99_ok = same is not None and same["p99_ms"] < best_peak["p99_ms"]
        row.update(value=f"{ratio:.0f}x ({gw_peak['rps']:.0f} vs {best_peak['rps']:.1f} req/s, "
                         f"{best['key']}); p99 {same['p99_ms'] if same else float('nan'):.1f} ms "
                         f"(c={same['connections'] if same else '?'}) vs {best_peak['p99_ms']:.1f} ms "
                         f"(c={best_peak['connections']})",
                   met=ratio >= TARGET_VS_CF and p99_ok,
                   bound="" if ratio >= TARGET_VS_CF else (
                       f"{TARGET_VS_CF:g}x would be {TARGET_VS_CF * best_peak['rps']:.0f} req/s, "
                       f"i.e. at most {cpus * 1e6 / (TARGET_VS_CF * best_peak['rps']):.0f} us of CPU "
                       f"per request on {cpus} cores for everything on the path; the gateway spends "
                       f"{_cpu_total(gw_peak):.0f} us (see the first row)"))
    else:
        row.update(value="not measured", met=None, bound=_missing(confs, "gateway", "contextforge"))
    rows.append(row)

    limits = ", ".join(f"{role} <= {us:g} us" for role, us in TARGET_CPU_US.items())
    row = {"target": f"CPU per tools/call in the full gateway (inspected echo, at peak): {limits}"}
    if gw_peak is not None and gw_peak["ok"]:
        spent = {role: gw_peak["processes"].get(role, {}).get("cpu_us_per_req") or 0.0
                 for role in TARGET_CPU_US}
        over = [role for role, us in spent.items() if us > TARGET_CPU_US[role]]
        row.update(value=", ".join(f"{role} {us:.0f} us" for role, us in spent.items())
                         + f" (c={gw_peak['connections']})",
                   met=not over,
                   bound="" if not over else f"over: {', '.join(over)}" + _profile_summary(result))
    else:
        row.update(value="not measured", met=None, bound=_missing(confs, "gateway"))
    rows.append(row)

    row = {"target": f"each Python service <= {RSS_LIMIT_MB:g} MB RSS under load (full gateway)"}
    if gw and gw.get("runs"):
        peaks: dict[str, float] = {}
        for run in gw["runs"] + ([gw["paced"]] if gw.get("paced") else []):
            for role, p in run["processes"].items():
                if role in gw["python_roles"]:
                    peaks[role] = max(peaks.get(role, 0.0), p["peak_rss_mb"])
        worst = max(peaks.values(), default=0.0)
        row.update(value=", ".join(f"{r} {mb:.0f} MB" for r, mb in sorted(peaks.items())),
                   met=worst <= RSS_LIMIT_MB,
                   bound="" if worst <= RSS_LIMIT_MB else "largest process over the limit")
    else:
        row.update(value="not measured", met=None, bound=_missing(confs, "gateway"))
    rows.append(row)

    rows.append(_aggregate_row(result.get("aggregate")))
    rows.append(_trust_row(result.get("trust")))

    errs = {c["key"]: sum(r["errors"] for r in c.get("runs", []) + ([c["paced"]] if c.get("paced") else []))
            for c in result["configurations"] if not c["key"].startswith("contextforge")}
    failed = [c["key"] for c in result["configurations"] if c.get("failed")]
    row = {"target": "zero errors in every run (ours: configurations 1-3)",
           "value": ", ".join(f"{k} {v}" for k, v in errs.items()) + (
               f"; failed: {', '.join(failed)}" if failed else ""),
           "met": (sum(errs.values()) == 0 and not [f for f in failed if f in errs]) if errs else None,
           "bound": "; ".join(
               f"{c['key']} {r['workload']} c={r['connections']}: {r['errors']} x "
               + (r.get("error_sample") or "").strip().splitlines()[0][:80].replace("|", "/")
               for c in result["configurations"] if c["key"] in errs
               for r in c.get("runs", []) + ([c["paced"]] if c.get("paced") else [])
               if r["errors"] and r.get("error_sample"))}
    rows.append(row)
    return rows


# The per-path tables (issue 18): each path of the gateway (configuration, workload) beside the
# same call on the baselines: the backend directly, Envoy with TLS only, ContextForge.
PATHS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Uninspected tools/call: echo (~1 KB) by a role with no masking obligation, ext_proc off",
     "gateway echo_plain", (("gateway", "echo_plain"), ("gateway_grpc", "echo_plain"),
                            ("gateway_audit_interval", "echo_plain"))),
    ("Inspected tools/call: echo (~1 KB) by a role the policy masks for, ext_proc on the answer",
     "gateway echo", (("gateway", "echo"), ("gateway_grpc", "echo"),
                      ("gateway_audit_interval", "echo"))),
    ("Inspected tools/call with PII: report (~10 KB, emails, phones, cards masked)",
     "gateway report", (("gateway", "report"), ("gateway_grpc", "report"))),
    ("tools/list, filtered per caller by ext_proc",
     "gateway list", (("gateway", "list"), ("gateway_grpc", "list"))),
    ("Aggregate endpoint: tools/call bench__echo through /mcp (inspected) beside /mcp/bench",
     "gateway echo_aggregate", (("gateway", "echo_aggregate"), ("gateway", "echo"))),
)
_BASELINES = ("direct", "envoy_tls", "contextforge", "contextforge_stateful")


def _path_rows(confs: dict[str, dict[str, Any]], workload: str,
               ours: tuple[tuple[str, str], ...]) -> list[tuple[str, dict[str, Any], str]]:
    """(label, configuration, workload) for one path: the baselines' same call, then ours."""
    base_workload = "echo" if workload.startswith("echo") else workload  # the same call there
    rows = [(key, confs[key], base_workload) for key in _BASELINES
            if key in confs and _runs(confs[key], base_workload)]
    rows += [(f"{key} `{w}`", confs[key], w) for key, w in ours if key in confs and _runs(confs[key], w)]
    return rows


def _path_tables(result: dict[str, Any]) -> list[str]:
    confs = _confs(result)
    lines = ["## Per path: the gateway against direct, Envoy-TLS-only and ContextForge", "",
             "Each path of the gateway beside the same call on the baselines, from this run's rows",
             "(`All runs` below). Direct and the gateway each have one backend instance. Peak: the",
             "highest OK req/s over the connection levels; `x direct` / `x Envoy-TLS`: that peak over",
             "theirs; p50 at c=1: one request at a time (the latency the path adds before any",
             "queueing); CPU: us per OK request by process at the peak.", ""]
    for title, _, ours in PATHS:
        workload = ours[0][1]
        rows = _path_rows(confs, workload, ours)
        if not any(label.startswith(("gateway", "gateway_grpc")) for label, _, _ in rows):
            continue
        base = "echo" if workload.startswith("echo") else workload
        d, e = _peak(confs.get("direct"), base), _peak(confs.get("envoy_tls"), base)
        lines += [f"### {title}", "",
                  "| configuration | peak req/s (c) | x direct | x Envoy-TLS | p50 ms at c=1 | "
                  "p99 ms at peak | CPU us/req at peak | errors |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for label, conf, w in rows:
            peak, one = _peak(conf, w), _at(conf, w, 1)
            if peak is None:
                continue
            cpu = ", ".join(f"{role} {p['cpu_us_per_req']:.0f}" for role, p in peak["processes"].items()
                            if p["cpu_us_per_req"])
            errors = sum(r["errors"] for r in _runs(conf, w))
            cells = [label, f"{peak['rps']:.0f} ({peak['connections']})",
                     f"{peak['rps'] / d['rps']:.2f}" if d and d["rps"] else "-",
                     f"{peak['rps'] / e['rps']:.2f}" if e and e["rps"] else "-",
                     f"{one['p50_ms']:.2f}" if one else "-", f"{peak['p99_ms']:.2f}", cpu, str(errors)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _lever_table(result)
    return lines


def _lever_table(result: dict[str, Any]) -> list[str]:
    """The levers of issue 18 whose before and after ran side by side in this run."""
    confs = _confs(result)
    rows: list[str] = []

    def cpu(run: dict[str, Any] | None) -> str:
        return f"{_cpu_total(run):.0f}" if run else "-"

    def rps(run: dict[str, Any] | None) -> str:
        return f"{run['rps']:.0f}" if run else "-"

    def authz(run: dict[str, Any]) -> str:
        return f"{run['processes'].get('ext_authz', {}).get('cpu_us_per_req') or 0:.0f}"

    # At each side's peak (a single level's figure swings with the machine's other work).
    gw, grpc = confs.get("gateway"), confs.get("gateway_grpc")
    for workload in ("echo_plain", "echo"):
        a, b = _peak(grpc, workload), _peak(gw, workload)
        if a and b:
            rows.append(f"| ext_authz over Envoy's HTTP mode instead of gRPC (`{workload}`, at "
                        f"peak) | kept | {rps(a)} req/s, {cpu(a)} us, ext_authz {authz(a)} us | "
                        f"{rps(b)} req/s, {cpu(b)} us, ext_authz {authz(b)} us | this run: "
                        "`gateway_grpc` -> `gateway` |")
    interval = confs.get("gateway_audit_interval")
    for workload in ("echo_plain", "echo"):
        a, b = _at(gw, workload, 1), _at(interval, workload, 1)
        pa, pb = _peak(gw, workload), _peak(interval, workload)
        if a and b and pa and pb:
            rows.append(f"| no fsync on the call's path: ext_authz's decision entry written before "
                        f"the request goes on, fsync'ed within 100 ms (`audit.sync: interval`; "
                        f"`{workload}`) | an operator's choice (default: `batch`) | "
                        f"c=1 p50 {a['p50_ms']:.2f} ms; peak {rps(pa)} req/s, {cpu(pa)} us | "
                        f"c=1 p50 {b['p50_ms']:.2f} ms; peak {rps(pb)} req/s, {cpu(pb)} us | "
                        "this run: `gateway` -> `gateway_audit_interval` |")
    a, b = _peak(gw), _peak(gw, "echo_plain")
    if a and b:
        rows.append(f"| ext_proc only on routes whose answer needs it (at peak) | kept | "
                    f"{rps(a)} req/s, {cpu(a)} us (masked) | {rps(b)} req/s, {cpu(b)} us (no "
                    "obligation) | this run: `gateway` echo -> echo_plain |")
    trust = result.get("trust") or {}
    tcpu = trust.get("gateway_cpu_us_per_call") or {}
    if "plain@asyncio" in tcpu and "plain" in tcpu:
        rows.append(f"| uvloop in every service | kept | {tcpu['plain@asyncio']:.0f} us/call | "
                    f"{tcpu['plain']:.0f} us/call | this run: `bench/trust_cpu.py` (one call at a time) |")
    if "inner_tls+assertion@asyncio" in tcpu and "inner_tls+assertion" in tcpu:
        rows.append(f"| uvloop, inner TLS and assertion on | kept | "
                    f"{tcpu['inner_tls+assertion@asyncio']:.0f} us/call | "
                    f"{tcpu['inner_tls+assertion']:.0f} us/call | this run: `bench/trust_cpu.py` |")
    micro = result.get("micro") or {}
    for line in (micro.get("bench_levers.py") or {}).get("stdout", "").splitlines():
        if line.startswith("JSON "):
            for lever in json.loads(line[len("JSON "):]):
                rows.append(f"| {lever['lever']}: {lever['after']} | kept | {lever['before']}: "
                            f"{lever['before_us']:.1f} us | {lever['after_us']:.1f} us | this run: "
                            "micro-benchmark `bench/bench_levers.py` (CPU per call) |")
    for script, lever in (("bench_ext_proc.py", "ext_proc server: grpc.aio against sync grpcio"),
                          ("bench_audit.py", "audit: one batched fsync per call")):
        if script in micro and not micro[script].get("failed"):
            rows.append(f"| {lever} | see below | | | this run: micro-benchmark `bench/{script}` |")
    if not rows:
        return []
    return ["### Levers: before and after in this run", "",
            "Gateway CPU is the sum over its processes (Envoy, ext_authz, ext_proc, backend, ...)",
            "per OK request. Levers measured in other runs and the ones dropped: docs/performance.md.",
            "", "| lever | kept | before | after | measured |", "|---|---|---|---|---|", *rows, ""]


def _aggregate_row(agg: dict[str, Any] | None) -> dict[str, Any]:
    """The aggregate endpoint's budget: gateway CPU per tools/call on /mcp over /mcp/<server>."""
    budget = float((agg or {}).get("budget_percent", TARGET_AGGREGATE_OVERHEAD))
    row: dict[str, Any] = {"target": f"tools/call through /mcp <= +{budget:g} % gateway CPU per "
                                     "call over /mcp/<server> (Envoy + ext_authz + ext_proc)"}
    if not agg or agg.get("failed"):
        row.update(value="not measured", met=None,
                   bound=(agg or {}).get("failed", "not run")[:300].replace("|", "/"))
        return row
    cpu = agg["gateway_cpu_us_per_call"]
    overhead = float(agg["aggregate_overhead_percent"])
    row.update(value=f"{overhead:+.1f} % ({cpu['aggregate']:.0f} vs {cpu['per-server']:.0f} us, "
                     f"{agg['calls_per_path']} calls per path)",
               met=overhead <= budget,
               bound="" if overhead <= budget else (
                   "by component (us/call, /mcp vs /mcp/<server>): " + ", ".join(
                       f"{name} {agg['by_component_us_per_call']['aggregate'][name]:.0f} vs "
                       f"{us:.0f}"
                       for name, us in agg["by_component_us_per_call"]["per-server"].items())))
    return row


def _aggregate_table(agg: dict[str, Any] | None) -> list[str]:
    """``tools/call`` through /mcp next to /mcp/<server>: CPU per call by process and the ratio."""
    lines = ["## Aggregate endpoint: /mcp against /mcp/<server>", ""]
    if not agg or agg.get("failed"):
        return [*lines, f"not measured: {(agg or {}).get('failed', 'not run')[:500]}"]
    by = agg["by_component_us_per_call"]
    names = list(by["per-server"])
    cpu = agg["gateway_cpu_us_per_call"]
    base = cpu["per-server"] or float("nan")
    lines += [
        "`bench/aggregate_cpu.py`: one dev stack (the bench backend, the aggregate endpoint on), one",
        "MCP session (2025-11-25) per path, `tools/call` of `bench__echo` on `/mcp` (ext_authz resolves",
        "the name, Envoy routes by header, the Lua filter rewrites it) and of `echo` on `/mcp/bench`,",
        f"one call at a time, in {agg.get('blocks', '?')} interleaved blocks of "
        f"{agg.get('calls_per_block', '?')} calls per path ({agg['calls_per_path']} calls each), so",
        "that load from other work on the machine falls on both alike. CPU: utime+stime from",
        "`/proc` of Envoy, ext_authz and ext_proc around each block (the backend and the aggregator,",
        "which `tools/call` does not reach, are left out).",
        "",
        "| path | " + " | ".join(f"{n} us/call" for n in names) + " | gateway us/call | ratio |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    for label, path in (("per-server", "/mcp/bench"), ("aggregate", "/mcp")):
        lines.append(f"| `{path}` | " + " | ".join(f"{by[label][n]:.0f}" for n in names)
                     + f" | {cpu[label]:.0f} | {cpu[label] / base:.3f} |")
    return lines


TRUST_LABELS = {"plain": "inner TLS off, assertion off", "assertion": "assertion on",
                "inner_tls+assertion": "inner TLS on, assertion on",
                "plain@asyncio": "standard asyncio loop: inner TLS off, assertion off",
                "inner_tls+assertion@asyncio": "standard asyncio loop: inner TLS on, assertion on"}


def _trust_row(trust: dict[str, Any] | None) -> dict[str, Any]:
    """The inner hops' budget: gateway CPU per tools/call with inner TLS and the caller assertion
    on over both off (bench/trust_cpu.py)."""
    budget = float((trust or {}).get("budget_percent", TARGET_TRUST_OVERHEAD))
    row: dict[str, Any] = {"target": f"inner TLS + caller assertion <= +{budget:g} % gateway CPU "
                                     "per call (Envoy + ext_authz + ext_proc + server)"}
    if not trust or trust.get("failed"):
        row.update(value="not measured", met=None,
                   bound=(trust or {}).get("failed", "not run")[:300].replace("|", "/"))
        return row
    cpu = trust["gateway_cpu_us_per_call"]
    both = float(trust["overhead_percent"]["inner_tls+assertion"])
    alone = float(trust["overhead_percent"]["assertion"])
    by = trust["by_process_us_per_call"]
    errors = {k: v for k, v in (trust.get("errors") or {}).items() if v}
    row.update(value=f"{both:+.1f} % ({cpu['inner_tls+assertion']:.0f} vs {cpu['plain']:.0f} us "
                     f"median; assertion alone {alone:+.1f} %; {trust['calls_per_variant']} calls "
                     "per variant"
                     + (f"; calls not answered: {', '.join(f'{k} {v}' for k, v in errors.items())}"
                        if errors else "") + ")",
               met=both <= budget,
               bound="" if both <= budget else (
                   "by process (us/call, both on vs off): " + ", ".join(
                       f"{name} {by['inner_tls+assertion'][name]:.0f} vs {us:.0f}"
                       for name, us in by["plain"].items())))
    return row


def _trust_table(trust: dict[str, Any] | None, started: str) -> list[str]:
    """``tools/call`` with inner TLS and the assertion off / on: CPU per call by process."""
    lines = ["## Inner TLS and the caller assertion: CPU per tools/call", ""]
    if not trust or trust.get("failed"):
        return [*lines, f"not measured: {(trust or {}).get('failed', 'not run')[:500]}"]
    by = trust["by_process_us_per_call"]
    names = list(by["plain"])
    cpu = trust["gateway_cpu_us_per_call"]
    over = trust["overhead_percent"]
    when = trust.get("measured_at")
    lines += [
        "`bench/trust_cpu.py`: five dev stacks side by side with the bench config but for",
        "`inner_tls.enabled`, `identity.assertion` and the event loop; one MCP session (2025-11-25)",
        "each, `tools/call` of `echo` on `/mcp/bench` one call at a time, in rounds of one block per",
        f"stack (the order rotates), {trust.get('blocks', '?')} blocks of "
        f"{trust.get('calls_per_block', '?')} calls per variant "
        f"({trust['calls_per_variant']} calls each). CPU: utime+stime",
        "from `/proc` of Envoy, ext_authz, ext_proc and the bench server around each block; each",
        "figure is the median over the blocks, the overhead the median over rounds of the ratio of",
        "the totals (single runs on this shared machine vary by several points)."
        + (f" Measured in run {when}." if when and when != started else ""),
        "",
        "| variant | " + " | ".join(f"{n} us/call" for n in names)
        + " | gateway us/call | overhead |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    for label, title in TRUST_LABELS.items():
        if label not in by:  # a result from before the event-loop rows
            continue
        extra = f"{over[label]:+.1f} %" if label in over else "-"
        lines.append(f"| {title} | " + " | ".join(f"{by[label][n]:.0f}" for n in names)
                     + f" | {cpu[label]:.0f} | {extra} |")
    saving = trust.get("uvloop_saving_percent")
    if saving:
        def said(percent: float) -> str:
            return f"{percent:.1f} %" if abs(percent) >= 0.5 else "nothing measurable"
        lines += ["", "The services run on uvloop (gateway.eventloop); the `standard asyncio loop` rows "
                  "are the same configs with `MCP_GATEWAY_EVENT_LOOP=asyncio`, in the same rounds. "
                  "uvloop's saving of the gateway's CPU per call (median of the per-round ratios): "
                  f"{said(saving['plain'])} with inner TLS and the assertion off, "
                  f"{said(saving['inner_tls+assertion'])} with both on."]
    counters = trust.get("envoy_clusters", {}).get("inner_tls+assertion", {})
    if counters:
        lines += ["", "Envoy's upstream connections and requests per cluster at the end (inner TLS on): "
                  + ", ".join(f"`{name}` {c.get('cx_total', 0)} / {c.get('rq_total', 0)}"
                              for name, c in sorted(counters.items()))
                  + " (connections are reused: no TLS handshake per request)."]
    return lines


def _authz_transport(conf: dict[str, Any] | None) -> str:
    transport = ((conf or {}).get("facts") or {}).get("ext_authz_transport")
    return {"http": "Envoy's HTTP mode", "grpc": "gRPC"}.get(transport or "", "gRPC")


def _missing(confs: dict[str, dict[str, Any]], *keys: str) -> str:
    why = [f"{k}: {confs[k]['failed'][:200]}" for k in keys if k in confs and confs[k].get("failed")]
    absent = [k for k in keys if k not in confs]
    return "; ".join(why + ([f"not run: {', '.join(absent)}"] if absent else []))


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def targets_text(result: dict[str, Any]) -> str:
    lines = ["targets:"]
    for row in evaluate(result):
        lines.append(f"  [{_verdict(row['met']).replace('*', '')}] {row['target']}: {row['value']}")
        if row["bound"]:
            lines.append(f"      bound: {row['bound']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- charts

def _charts(result: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    confs = [c for c in result["configurations"] if c.get("runs")]
    made: list[tuple[str, str]] = []
    workloads = [w for w in ("echo", "list", "report") if any(_runs(c, w) for c in confs)]

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for c in confs:
            runs = sorted(_runs(c, w), key=lambda r: r["connections"])
            if runs:
                ax.plot([r["connections"] for r in runs], [r["rps"] for r in runs], marker="o",
                        label=c["key"], color=COLORS.get(c["key"]))
        ax.set(title=result["workloads"][w]["description"], xlabel="concurrent connections",
               ylabel="OK responses / s", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    made.append(("Throughput by concurrency (log scales)", "throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in confs:
        runs = _runs(c, "echo")
        if not runs:
            continue
        run = max(runs, key=lambda r: r["connections"])
        xs = [max(ms, 1e-3) for _, ms in run["cdf_ms"]]
        ys = [q for q, _ in run["cdf_ms"]]
        ax.plot(xs, ys, label=f"{c['key']} (c={run['connections']})", color=COLORS.get(c["key"]))
        if c.get("paced"):
            p = c["paced"]
            ax.plot([max(ms, 1e-3) for _, ms in p["cdf_ms"]], [q for q, _ in p["cdf_ms"]],
                    linestyle="--", color=COLORS.get(c["key"]),
                    label=f"{c['key']} paced ~{p['rps']:.0f} req/s")
    ax.set(title="tools/call echo: latency CDF", xlabel="latency (ms, log)", ylabel="percentile",
           xscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    made.append(("Latency CDF, tools/call echo (highest concurrency; dashed: paced at half "
                 "saturation)", "latency_cdf.png"))

    # Linear scales (stacked bars on a log axis hide the bottom segments); ContextForge is ~100x
    # costlier, so it gets its own panel.
    groups = [[c for c in confs if not c["key"].startswith("contextforge")],
              [c for c in confs if c["key"].startswith("contextforge")]]
    groups = [g for g in groups if any(_peak(c) for c in g)]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.5),
                             squeeze=False)
    roles = sorted({role for c in confs for r in _runs(c, "echo") for role in r["processes"]} | {"wrk"})
    for ax, group in zip(axes[0], groups, strict=False):
        labels: list[str] = []
        bars: dict[str, list[float]] = {role: [] for role in roles}
        for c in group:
            peak = _peak(c)
            if peak is None:
                continue
            run = peak
            labels.append(c["key"])
            for role in roles:
                if role == "wrk":
                    bars[role].append(run["wrk_cpu_s"] / max(run["ok"], 1) * 1e6)
                else:
                    bars[role].append(run["processes"].get(role, {}).get("cpu_us_per_req") or 0.0)
        bottoms = [0.0] * len(labels)
        for role in roles:
            if any(bars[role]):
                ax.bar(labels, bars[role], bottom=bottoms, label=role)
                bottoms = [b + v for b, v in zip(bottoms, bars[role], strict=True)]
        ax.set(ylabel="CPU microseconds / request")
        ax.legend(fontsize=8)
    fig.suptitle("CPU per tools/call echo request, by process (at peak throughput)")
    fig.tight_layout()
    fig.savefig(out / "cpu_breakdown.png", dpi=110)
    plt.close(fig)
    made.append(("Overhead breakdown: CPU per request by process", "cpu_breakdown.png"))
    return made


# ---------------------------------------------------------------------------------- markdown

def _table(result: dict[str, Any]) -> list[str]:
    lines = ["| configuration | workload | conns | req/s | p50 ms | p99 ms | errors "
             "| CPU us/req by process | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for c in result["configurations"]:
        runs = c.get("runs", []) + ([c["paced"]] if c.get("paced") else [])
        if c.get("failed"):
            lines.append(f"| {c['key']} | failed | | | | | | {c['failed'][:150]} | |")
        for r in runs:
            cpu = ", ".join(f"{role} {p['cpu_us_per_req']:.0f}" for role, p in r["processes"].items()
                            if p["cpu_us_per_req"] is not None)
            rss = ", ".join(f"{role} {p['peak_rss_mb']:.0f}" for role, p in r["processes"].items())
            conns = (f"{r['connections']} paced" if r.get("paced_rps") or r.get("paced_delay_ms")
                     else str(r["connections"]))
            lines.append(f"| {c['key']} | {r['workload']} | {conns} | {r['rps']:.1f} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {cpu} | {rss} |")
    return lines


def render_markdown(result: dict[str, Any], charts: list[tuple[str, str]]) -> str:
    m = result["machine"]
    plan = result["plan"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`make bench QUICK=1` for a short run) from `bench/`; do not edit",
        "by hand. Raw numbers of this run: [`benchmarks.json`](benchmarks.json).",
        "",
        f"Run {result['started']} ({result['mode']} mode, {result.get('elapsed_s', 0):.0f} s) on "
        f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, Envoy {m['envoy'] or '?'}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])}"
        + (f", at end {', '.join(f'{x:.1f}' for x in m['loadavg_at_end'])}"
           if m.get("loadavg_at_end") else "") + " (other work on the machine included). "
        "Everything (load generator included) shares these cores, so absolute numbers are low and "
        "noisy; the ratios between configurations measured in the same run are what the targets use.",
        "",
        "## What is measured",
        "",
        "- Same backend everywhere: `bench/backend.py` on `mcp_servers.core` (one process, with its",
        "  fsync'ed result audit file as the dev stack runs MCP servers), tools",
        "  `echo` (returns its ~1 KB arguments) and `report` (a ~10 KB text with emails, phone and card",
        "  numbers).",
        "- Configurations: (1) the backend directly over HTTP; (2) Envoy with TLS and a router only;",
        "  (3) the full gateway from the dev stack (TLS, JWT, Rego policy, per-user rate limit, access",
        "  log, ext_proc when installed, the aggregate endpoint `/mcp`) with the default config, on",
        "  fresh ports, with the bench server added to the policy data for the `engineer` role (the",
        "  example policy masks PII for it: `echo`, `report` and `list` are inspected) and the `admin`",
        "  role (nothing masked: `echo_plain` takes the route without ext_proc, the uninspected path);",
        "  `echo_aggregate` is the engineer's echo through `/mcp` as `bench__echo`; (3b) the same with",
        "  ext_authz over gRPC; (3c) the same with `audit.sync: interval` (ext_authz's decision entry",
        "  written before the request goes on and fsync'ed within 100 ms: no fsync on the call's path);",
        "  (4) IBM ContextForge 1.1.0 with JWT auth in front of the same backend, default mode and",
        "  `USE_STATEFUL_SESSIONS=true` (one MCP session shared by the connections).",
        f"- Load: wrk (HTTP/1.1, TLS where the configuration has it), {tuple(plan['levels'])} connections "
        f"for {plan['seconds']:g} s each after a {plan['warmup']:g} s warm-up per workload; "
        f"ContextForge {tuple(plan['cf_levels'])} connections for {plan['cf_seconds']:g} s. At most 2 wrk "
        "threads. Every request has a unique JSON-RPC id; a response is OK only when it is HTTP 200 "
        "with a JSON-RPC result for that id (not an error, not `isError`). req/s counts OK "
        "responses only; errors count everything else (including timeouts and socket errors).",
        "- Our configurations speak protocol 2026-07-28 (stateless, `_meta` in each request);",
        "  ContextForge gets 2025-06-18.",
        "- CPU per request: utime+stime from `/proc/<pid>/stat` of every process of the",
        "  configuration (children included) before and after the window, divided by OK responses.",
        "  Peak RSS: `VmHWM` of the largest process of that role.",
        "- Half saturation: wrk offers half of the full gateway's peak tools/call throughput on a",
        "  clock schedule (exponential gaps, open loop: the offered rate does not depend on the",
        "  answers' latency), the same rate for Envoy-TLS-only.",
        "",
        "## Targets (issue 18)",
        "",
        "| target | measured | verdict | what bounds it |",
        "|---|---|---|---|",
    ]
    for row in evaluate(result):
        lines.append(f"| {row['target']} | {row['value']} | {_verdict(row['met'])} | {row['bound']} |")
    prof = result.get("profile")
    if prof:
        from bench.profile import markdown as profile_markdown
        lines += ["", "## Where the CPU goes (py-spy, full gateway)", ""] + profile_markdown(prof)
    if any(c.get("runs") for c in result["configurations"]):
        lines += ["", *_path_tables(result)]
    if "aggregate" in result:
        lines += ["", *_aggregate_table(result["aggregate"])]
    if "trust" in result:
        lines += ["", *_trust_table(result["trust"], result["started"])]
    lines += ["", "## Charts", ""]
    for title, name in charts:
        lines += [f"### {title}", "", f"![{title}](benchmarks/{name})", ""]
    lines += ["## All runs", ""] + _table(result)
    for c in result["configurations"]:
        if c.get("facts"):
            lines += ["", f"- {c['key']}: started in {c.get('startup_s', '?')} s; "
                          f"{json.dumps(c['facts'])}"]
    micro = result.get("micro") or {}
    if micro:
        lines += ["", "## Micro-benchmarks", ""]
        for script, res in micro.items():
            lines += [f"### `bench/{script}`", ""]
            if res.get("failed") or res.get("returncode"):
                lines += [f"failed: {res.get('failed') or res.get('stderr', '')[-500:]}", ""]
            else:
                lines += [res["stdout"].strip(), ""]
    lines += ["", "## Reproduce", "", "```",
              "make bench            # ~20 min (the ContextForge venv: ~1 min more the first time)",
              "make bench QUICK=1    # < 3 min",
              ".venv/bin/python -m bench.run --only aggregate,trust --no-micro   # the comparisons only",
              "```",
              "Needs `wrk` (`sudo apt-get install wrk`); ContextForge is installed on first use into "
              "`.bench/cf-venv` with Python 3.12 (set `CF_PYTHON` to another 3.12/3.13 interpreter).",
              ""]
    return "\n".join(lines)


# Sections of benchmarks.md a comparisons-only run replaces (by the start of their heading).
_MERGED_SECTIONS = ("## Targets", "## Per path", "## Aggregate endpoint",
                    "## Inner TLS and the caller assertion", "## Micro-benchmarks")


def _split_sections(text: str) -> list[str]:
    """``text`` cut before every level-2 heading (the first part: what precedes the first)."""
    parts: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("## ") and current:
            parts.append("".join(current))
            current = []
        current.append(line)
    parts.append("".join(current))
    return parts


def merge_docs(partial: dict[str, Any], docs: Path, keys: tuple[str, ...]) -> Path:
    """A run of side-by-side comparisons only (``--only aggregate,trust``): their results replace
    those in the last full run's ``benchmarks.json`` (micro-benchmarks script by script); in
    ``benchmarks.md`` only the targets table, the per-path tables (their levers table reads the
    micro-benchmarks), the comparisons' sections and the micro-benchmarks are replaced (a missing
    one goes before the charts), so notes added to the file by hand stay."""
    md = docs / "benchmarks.md"
    result: dict[str, Any] = json.loads((docs / "benchmarks.json").read_text(encoding="utf-8"))
    for key in keys:
        if key == "micro" and key in partial:  # the scripts this run ran, the others kept
            result[key] = {**result.get(key, {}), **partial[key]}
        elif key in partial:
            result[key] = partial[key]
    # Keyed by the section's name (its heading's start), so a heading whose wording changed
    # (``## Targets (issue 9)`` -> ``(issue 18)``) is replaced, not kept beside the new one.
    fresh = {next(s for s in _MERGED_SECTIONS if part.startswith(s)): part
             for part in _split_sections(render_markdown(result, []))
             if part.startswith(_MERGED_SECTIONS)}
    parts = _split_sections(md.read_text(encoding="utf-8"))
    for name, part in fresh.items():
        at = next((i for i, old in enumerate(parts) if old.startswith(name)), None)
        if at is not None:
            parts[at] = part
        else:
            charts = next((i for i, old in enumerate(parts) if old.startswith("## Charts")),
                          len(parts))
            parts.insert(charts, part)
    (docs / "benchmarks.json").write_text(json.dumps(result, indent=1))
    md.write_text("".join(parts))
    return md


def write_docs(result: dict[str, Any], docs: Path) -> Path:
    charts = _charts(result, docs / "benchmarks")
    (docs / "benchmarks.json").write_text(json.dumps(result, indent=1))
    md = docs / "benchmarks.md"
    md.write_text(render_markdown(result, charts))
    return md
