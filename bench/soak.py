"""``python -m bench.soak [--minutes 10] [--concurrency 8] [--interval 10]``: a soak run.

Starts the full gateway exactly as ``bench.run``'s configuration 3 does (``FullGateway``: the dev
stack on a private config, ``bench.backend`` as its one server), warms it up, then keeps wrk
(TLS, ``wrk_mcp.lua``: unique ids, OK only for a successful JSON-RPC result) running for the whole
duration in consecutive slices of ``--interval`` seconds that rotate through the workloads
(tools/call echo, tools/list, tools/call report with 10 KB of PII to mask). After every slice it
reads each gateway process's VmRSS, CPU time, open file descriptors and threads from /proc.

Writes ``docs/soak.md`` (errors by workload and slice, throughput over time, RSS at start / end /
max with growth, file descriptors, a verdict per process), ``docs/soak/rss.png`` and the raw
samples in ``bench/results/soak-<timestamp>.json``. Everything listens on 127.0.0.1; the run ends
by itself, and every process is stopped by process group, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.configs import FullGateway, RunContext, ensure_certs
from bench.loadgen import WORKLOADS, LoadError, find_wrk, run_wrk
from bench.procs import cpu_seconds, group_members

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ROTATION = ("echo", "list", "report")
# Growth of resident memory after warm-up below which a process counts as stable: allocator
# arenas, caches and connection buffers settle within a few MB; a leak per request passes 10 MB
# long before 10 minutes at hundreds of requests per second.
STABLE_MB = 10.0
KB_PER_MB = 1024.0
# A process under the threshold that is still climbing this fast over the run's second half is
# flagged: a longer run would cross the threshold.
CLIMBING_MB_PER_MIN = 0.25


@dataclass
class Sample:
    """One reading of every process, ``t`` seconds after the measured load began."""

    t: float
    phase: str  # "started", "warmed", "load", "end"
    procs: dict[str, dict[str, float]] = field(default_factory=dict)


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def components(conf: FullGateway) -> dict[str, int]:
    """Process label (``ext_authz[1]``, ``backend[0]`` ...) -> PID of the group leader."""
    stack = getattr(conf, "stack", None)
    if stack is None:
        return {}
    out = {}
    for comp in stack.components:
        proc = stack.procs.get(comp.label)
        if proc is not None:
            name = "backend" if comp.name == "bench" else comp.name
            out[f"{name}[{comp.instance}]"] = proc.pid
    return out


def read_process(leader: int) -> dict[str, float] | None:
    """RSS / peak RSS (MB), CPU seconds, fds and threads of a process and what it forked."""
    pids = group_members(leader) or ([leader] if Path(f"/proc/{leader}").exists() else [])
    if not pids:
        return None
    rss = hwm = fds = threads = 0
    cpu = 0.0
    for pid in pids:
        rss += _status_kb(pid, "VmRSS") or 0
        hwm += _status_kb(pid, "VmHWM") or 0
        threads += _status_kb(pid, "Threads") or 0  # a bare count, read by the same parser
        fds += _fd_count(pid) or 0
        cpu += cpu_seconds(pid) or 0.0
    return {"rss_mb": round(rss / KB_PER_MB, 2), "hwm_mb": round(hwm / KB_PER_MB, 2),
            "cpu_s": round(cpu, 2), "fds": fds, "threads": threads, "procs": len(pids)}


def sample(conf: FullGateway, t: float, phase: str) -> Sample:
    out = Sample(round(t, 1), phase)
    for label, pid in components(conf).items():
        got = read_process(pid)
        if got is not None:
            out.procs[label] = got
    return out


def one_slice(conf: FullGateway, workload: str, connections: int, seconds: int,
              t0: float) -> dict[str, Any]:
    began = time.monotonic() - t0
    res = run_wrk(conf.target(), WORKLOADS[workload], connections=connections, seconds=seconds)
    duration = res["duration_us"] / 1e6
    errors = int(res["bad"]) + sum(int(res[k]) for k in (
        "errors_connect", "errors_read", "errors_write", "errors_timeout"))
    rec: dict[str, Any] = {
        "t_start": round(began, 1), "t_end": round(time.monotonic() - t0, 1),
        "workload": workload, "seconds": round(duration, 2), "requests": int(res["requests"]),
        "ok": int(res["ok"]), "errors": errors,
        "rps": round(int(res["ok"]) / duration, 1) if duration else 0.0,
        "p50_ms": res["p50_us"] / 1000, "p99_ms": res["p99_us"] / 1000}
    if errors:
        rec["error_detail"] = {k: int(res[k]) for k in (
            "bad", "errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout")}
        rec["error_sample"] = res["stderr"]
    return rec


def soak(conf: FullGateway, *, seconds: float, connections: int, interval: int,
         result: dict[str, Any]) -> None:
    """Warm up, then load in slices until ``seconds`` have passed; fills ``result`` as it goes
    so an interrupted run still has what it measured."""
    samples: list[Sample] = result["samples"]
    slices: list[dict[str, Any]] = result["slices"]
    started = time.monotonic()
    conf.start()
    result["startup_s"] = round(time.monotonic() - started, 1)
    result["processes"] = components(conf)
    warm = len(ROTATION) * interval
    print(f"gateway up in {result['startup_s']} s; warming up {warm:g} s", flush=True)
    t0 = time.monotonic() + warm  # t = 0 where the measured load begins
    samples.append(sample(conf, -warm, "started"))
    for name in ROTATION:
        rec = one_slice(conf, name, connections, interval, t0)
        result["warmup"].append(rec)
    samples.append(sample(conf, time.monotonic() - t0, "warmed"))
    t0 = time.monotonic()
    samples[-1].t = 0.0
    n = 0
    while time.monotonic() - t0 < seconds - 0.5:
        name = ROTATION[n % len(ROTATION)]
        left = seconds - (time.monotonic() - t0)
        rec = one_slice(conf, name, connections, max(1, min(interval, round(left))), t0)
        slices.append(rec)
        result["load_s"] = round(time.monotonic() - t0, 1)
        samples.append(sample(conf, time.monotonic() - t0, "load"))
        dead = sorted(set(result["processes"]) - set(samples[-1].procs))
        rss = sum(p["rss_mb"] for p in samples[-1].procs.values())
        print(f"  {rec['t_end']:7.1f} s  {name:<6} {rec['rps']:8.1f} req/s  errors {rec['errors']:<4}"
              f" total RSS {rss:7.1f} MB", flush=True)
        if dead:
            result["dead"] = dead
            print(f"!! processes gone: {', '.join(dead)}; ending the soak", flush=True)
            break
        n += 1
    result["load_s"] = round(time.monotonic() - t0, 1)
    samples[-1].phase = "end"


# ------------------------------------------------------------------------------------ report

def summarise(result: dict[str, Any]) -> dict[str, Any]:
    samples: list[Sample] = result["samples"]
    base = next((s for s in samples if s.phase == "warmed"), None)
    last = samples[-1] if samples else None
    per: dict[str, dict[str, Any]] = {}
    if base is None or last is None:
        return per
    minutes = max(last.t - base.t, 1.0) / 60
    for label in result["processes"]:
        series = [(s.t, s.procs[label]) for s in samples if label in s.procs and s.t >= 0]
        if not series or label not in base.procs:
            per[label] = {"missing": True}
            continue
        start = base.procs[label]
        end = series[-1][1]
        growth = end["rss_mb"] - start["rss_mb"]
        half = [(t, p["rss_mb"]) for t, p in series if t >= series[-1][0] / 2]
        per[label] = {
            "rss_start_mb": start["rss_mb"], "rss_end_mb": end["rss_mb"],
            "rss_max_mb": max(p["rss_mb"] for _, p in series), "hwm_end_mb": end["hwm_mb"],
            "growth_mb": round(growth, 2), "mb_per_min": round(growth / minutes, 3),
            "slope_last_half_mb_per_min": round(_slope(half) * 60, 3),
            "fds_start": start["fds"], "fds_end": end["fds"],
            "threads_start": start["threads"], "threads_end": end["threads"],
            "cpu_s": round(end["cpu_s"] - start["cpu_s"], 1),
            "alive_at_end": label in last.procs,
            "stable": label in last.procs and growth < STABLE_MB}
    return per


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second); 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples: list[Sample] = result["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for label in result["processes"]:
        pts = [(s.t / 60, s.procs[label]["rss_mb"]) for s in samples if label in s.procs]
        if pts:
            top.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=3,
                     linewidth=1.2, label=label)
    warm_start = min((s.t for s in samples), default=0.0) / 60
    for ax in (top, bottom):
        ax.axvspan(warm_start, 0, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
    top.set_ylabel("RSS (MB)")
    top.set_title("Full gateway under a soak load: resident memory per process "
                  "(grey: warm-up)")
    top.legend(fontsize=8, ncol=4, loc="best")
    colours = {"echo": "tab:blue", "list": "tab:green", "report": "tab:red"}
    for name in ROTATION:
        pts = [((r["t_start"] + r["t_end"]) / 120, r["rps"]) for r in
               result["warmup"] + result["slices"] if r["workload"] == name]
        bottom.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                    linewidth=0.8, color=colours[name], label=WORKLOADS[name].description)
    errs = [((r["t_start"] + r["t_end"]) / 120, r["rps"]) for r in result["slices"] if r["errors"]]
    if errs:
        bottom.scatter([p[0] for p in errs], [p[1] for p in errs], marker="x", color="black",
                       zorder=3, label="slice with errors")
    bottom.set_ylabel("successful req/s")
    bottom.set_xlabel("minutes since the measured load began")
    bottom.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(result: dict[str, Any], per: dict[str, dict[str, Any]], path: Path,
                   chart: Path | None) -> None:
    slices: list[dict[str, Any]] = result["slices"]
    a = result["args"]
    m = result["machine"]
    total_req = sum(r["requests"] for r in slices)
    total_ok = sum(r["ok"] for r in slices)
    total_err = sum(r["errors"] for r in slices)
    load_s = result.get("load_s", 0.0)
    lines = [
        "# Soak benchmark: the full gateway under sustained load",
        "",
        f"Generated by `python -m bench.soak --minutes {a['minutes']:g} --concurrency "
        f"{a['concurrency']} --interval {a['interval']:g}` on {result['started']} "
        f"(raw samples: `{result.get('raw', '')}`). Not a test: a record of one run.",
        "",
        "**Set-up.** The full gateway exactly as configuration 3 of `make bench` "
        "(`bench.configs.FullGateway`: the dev stack from `gatewayctl/devstack/` on a private "
        "config, Envoy with TLS, JWT + Rego in ext_authz, ext_proc inspection and PII masking, "
        "`bench/backend.py` as the one MCP server), all on 127.0.0.1. "
        f"wrk over TLS with `bench/wrk_mcp.lua` (every request a unique JSON-RPC id; OK only for "
        f"HTTP 200 with a JSON-RPC result for that id that is not an error), {a['concurrency']} "
        f"connections, closed loop, in consecutive {a['interval']:g}-second slices rotating "
        "through " + ", ".join(f"`{n}` ({WORKLOADS[n].description})" for n in ROTATION) + ". "
        "Each slice opens fresh connections (TLS handshakes included). After every slice the "
        "harness reads VmRSS, CPU time, `/proc/<pid>/fd` and threads of every gateway process; "
        f"VmHWM at the end. Warm-up: one {a['interval']:g}-second slice of each workload, not "
        "counted; \"start\" below is the reading after warm-up.",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), Python {m.get('python')}, "
        f"Envoy {m.get('envoy')}, load average {_load(m.get('loadavg_at_start'))} at start and "
        f"{_load(result.get('loadavg_at_end'))} at end (the machine is shared: other jobs ran "
        "at the same time, so throughput is indicative only; memory and errors are the point).",
        "",
        "## Result",
        "",
        f"- Duration of measured load: **{load_s / 60:.1f} min** ({load_s:.0f} s, "
        f"{len(slices)} slices), after {result.get('startup_s', 0)} s start-up and "
        f"{sum(r['seconds'] for r in result['warmup']):.0f} s warm-up.",
        f"- Requests: **{total_req:,}**, successful **{total_ok:,}**, "
        f"mean {total_ok / load_s if load_s else 0:.1f} req/s.",
        f"- Errors (any non-OK answer, connect/read/write error or timeout): **{total_err}**"
        + (f" (plus {sum(r['errors'] for r in result['warmup'])} during warm-up)"
           if any(r["errors"] for r in result["warmup"]) else "") + ".",
    ]
    if result.get("dead"):
        lines.append(f"- **Processes that exited during the run: {', '.join(result['dead'])}.**")
    if result.get("interrupted"):
        lines.append("- **The run was interrupted before its end; figures cover what ran.**"
                     + (f" Load generator error: `{result['load_error'][:300]}`"
                        if result.get("load_error") else ""))
    stable = [k for k, v in per.items() if v.get("stable")]
    lines += [f"- Memory: {len(stable)} of {len(per)} processes stable (RSS growth after warm-up "
              f"under {STABLE_MB:g} MB).", ""]

    lines += ["## Errors and throughput by workload", "",
              "| workload | slices | requests | OK | errors | mean req/s | min / max slice req/s "
              "| median p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ROTATION:
        rs = [r for r in slices if r["workload"] == name]
        if not rs:
            continue
        secs = sum(r["seconds"] for r in rs)
        p99 = sorted(r["p99_ms"] for r in rs)[len(rs) // 2]
        lines.append(f"| {name} | {len(rs)} | {sum(r['requests'] for r in rs):,} | "
                     f"{sum(r['ok'] for r in rs):,} | {sum(r['errors'] for r in rs)} | "
                     f"{sum(r['ok'] for r in rs) / secs:.1f} | {min(r['rps'] for r in rs):.1f} / "
                     f"{max(r['rps'] for r in rs):.1f} | {p99:.1f} |")
    bad = [r for r in slices if r["errors"]]
    lines += ["", "Slices with errors: " + ("none." if not bad else "")]
    for r in bad:
        detail = ", ".join(f"{k} {v}" for k, v in r.get("error_detail", {}).items() if v)
        sample_text = " ".join(r.get("error_sample", "").split())[:200]
        lines.append(f"- {r['t_start']:.0f}-{r['t_end']:.0f} s, {r['workload']}: {r['errors']} "
                     f"({detail}); wrk said: `{sample_text}`")

    outcomes: dict[str, int] = result.get("envoy_outcomes", {})
    if outcomes:
        lines += ["", "Envoy's access log, answers other than 200 over the whole run (warm-up "
                  "included) by status and response details. `0 downstream_remote_disconnect` is "
                  "wrk closing its connections at the end of each slice with requests in flight; "
                  "wrk counts those neither as OK nor as errors.", "",
                  "| status and details | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])]

    lines += ["", "## Throughput over time (per minute)", "",
              "| minute | echo req/s | list req/s | report req/s | requests | errors |",
              "|---:|---:|---:|---:|---:|---:|"]
    by_min: dict[int, list[dict[str, Any]]] = {}
    for r in slices:
        by_min.setdefault(int(r["t_start"] // 60), []).append(r)
    for minute, rs in sorted(by_min.items()):
        cells = []
        for name in ROTATION:
            w = [r for r in rs if r["workload"] == name]
            secs = sum(r["seconds"] for r in w)
            cells.append(f"{sum(r['ok'] for r in w) / secs:.1f}" if secs else "-")
        lines.append(f"| {minute + 1} | {' | '.join(cells)} | {sum(r['requests'] for r in rs):,} "
                     f"| {sum(r['errors'] for r in rs)} |")

    lines += ["", "## Memory and file descriptors per process", "",
              f"RSS in MB (VmRSS). Start = after warm-up; growth = end - start; MB/min over the "
              f"measured load; the last-half slope is a least-squares fit over the second half "
              f"of the run (a leak keeps climbing there, warm-up effects do not). Verdict: "
              f"**stable** when growth < {STABLE_MB:g} MB; flagged as still climbing when the "
              f"last-half slope is {CLIMBING_MB_PER_MIN:g} MB/min or more.", "",
              "| process | RSS start | RSS end | RSS max | VmHWM | growth MB | MB/min | "
              "last-half MB/min | fds start / end | threads start / end | CPU s | verdict |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, v in per.items():
        if v.get("missing"):
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | - | - | **not measured** |")
            continue
        verdict = ("**stable, still climbing**" if v["stable"] and _climbing(v) else
                   "stable" if v["stable"] else
                   "**exited**" if not v["alive_at_end"] else "**growing**")
        lines.append(
            f"| {label} | {v['rss_start_mb']:.1f} | {v['rss_end_mb']:.1f} | {v['rss_max_mb']:.1f} | "
            f"{v['hwm_end_mb']:.1f} | {v['growth_mb']:+.1f} | {v['mb_per_min']:+.2f} | "
            f"{v['slope_last_half_mb_per_min']:+.2f} | {v['fds_start']} / {v['fds_end']} | "
            f"{v['threads_start']} / {v['threads_end']} | {v['cpu_s']:.0f} | {verdict} |")
    lines += ["", "Verdicts:"]
    for label, v in per.items():
        if v.get("missing"):
            lines.append(f"- {label}: not measured.")
        elif v["stable"] and _climbing(v):
            lines.append(f"- {label}: under the threshold ({v['growth_mb']:+.1f} MB after warm-up) "
                         f"but still climbing {v['slope_last_half_mb_per_min']:+.2f} MB/min over "
                         f"the second half (flag at {CLIMBING_MB_PER_MIN:g}): a longer run would "
                         f"cross {STABLE_MB:g} MB; worth a look.")
        elif v["stable"]:
            lines.append(f"- {label}: stable ({v['growth_mb']:+.1f} MB after warm-up, under "
                         f"{STABLE_MB:g} MB).")
        elif not v["alive_at_end"]:
            lines.append(f"- {label}: exited during the run.")
        else:
            lines.append(f"- {label}: GROWING ({v['growth_mb']:+.1f} MB after warm-up, "
                         f"{v['mb_per_min']:+.2f} MB/min; threshold {STABLE_MB:g} MB).")
    if chart is not None:
        rel = os.path.relpath(chart, path.parent)
        lines += ["", f"![RSS per process and throughput over time]({rel})"]
    lines += ["", "Re-run: `make bench SOAK=1` (10 minutes) or `python -m bench.soak --minutes 1` "
              "for a check.", ""]
    path.write_text("\n".join(lines))


def envoy_outcomes(log: Path) -> dict[str, int]:
    """Envoy's access log tallied by "status details" for answers other than 200 (the whole run,
    warm-up included): names the cause of each error wrk counted."""
    out: dict[str, int] = {}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("status") != 200 and "status" in entry:
            key = f"{entry.get('status')} {entry.get('details')}"
            out[key] = out.get(key, 0) + 1
    return out


def _climbing(v: dict[str, Any]) -> bool:
    return float(v["slope_last_half_mb_per_min"]) >= CLIMBING_MB_PER_MIN


def _load(value: Any) -> str:
    return " / ".join(f"{x:.2f}" for x in value) if value else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="measured load (default 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="wrk connections (default 8)")
    # wrk takes whole seconds.
    parser.add_argument("--interval", type=int, default=10,
                        help="seconds per slice and between samples (default 10)")
    parser.add_argument("--no-docs", action="store_true",
                        help="write only bench/results/soak-*.json, not docs/soak.md")
    parser.add_argument("--render", type=Path, metavar="RAW_JSON",
                        help="only rewrite docs/soak.md from a finished run's raw results")
    args = parser.parse_args(argv)
    if args.render is not None:
        return render(args.render)
    if args.minutes <= 0 or args.concurrency < 1 or args.interval < 1:
        parser.error("--minutes must be > 0, --concurrency >= 1, --interval >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    find_wrk()

    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops every process group.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored: restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = ROOT / ".bench" / f"soak-{stamp}"
    work.mkdir(parents=True)
    (ROOT / ".bench" / ".gitignore").write_text("*\n")
    ctx = RunContext(work)
    ensure_certs(ctx)
    result: dict[str, Any] = {
        "started": stamp, "args": vars(args), "machine": report.machine_facts(),
        "stable_mb": STABLE_MB, "processes": {}, "samples": [], "warmup": [], "slices": []}
    conf = FullGateway(ctx)
    code = 0
    try:
        soak(conf, seconds=args.minutes * 60, connections=args.concurrency,
             interval=args.interval, result=result)
    except KeyboardInterrupt:
        result["interrupted"] = True
        code = 130
        print("\ninterrupted: stopping the gateway", file=sys.stderr, flush=True)
    except LoadError as exc:
        # wrk itself failed (not the gateway): keep what was measured, say so, exit non-zero.
        result["interrupted"] = True
        result["load_error"] = str(exc)[:1000]
        code = 1
        logger.error("load generator failed: %s", exc)
    finally:
        # A second Ctrl-C must not cut the stop short and leave process groups behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            conf.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
    result["loadavg_at_end"] = os.getloadavg()
    result["envoy_outcomes"] = envoy_outcomes(work / "state" / "logs" / "envoy-0.log")
    return finish(result, ROOT / "bench" / "results" / f"soak-{stamp}.json", code,
                  docs=not args.no_docs)


def finish(result: dict[str, Any], raw: Path, code: int, *, docs: bool) -> int:
    """Summarise, write the raw JSON and (``docs``) docs/soak.md with its chart; print a summary."""
    per = summarise(result)
    raw.parent.mkdir(exist_ok=True)
    result["raw"] = str(raw.relative_to(ROOT))
    result["summary"] = per
    raw.write_text(json.dumps({**result, "samples": [vars(s) for s in result["samples"]]}, indent=1))
    print(f"raw results: {raw}")
    if not result["slices"]:
        print("no load slice completed: docs not written", file=sys.stderr)
        return code or 1
    if docs:
        chart = ROOT / "docs" / "soak" / "rss.png"
        write_chart(result, chart)
        md = ROOT / "docs" / "soak.md"
        write_markdown(result, per, md, chart)
        print(f"report: {md}")
    total_err = sum(r["errors"] for r in result["slices"])
    print(f"requests {sum(r['requests'] for r in result['slices'])}, errors {total_err}")
    for label, v in per.items():
        if not v.get("missing"):
            print(f"  {label:<14} RSS {v['rss_start_mb']:7.1f} -> {v['rss_end_mb']:7.1f} MB "
                  f"(max {v['rss_max_mb']:.1f}, {v['growth_mb']:+.1f} MB, {v['mb_per_min']:+.2f} MB/min)"
                  f"  fds {v['fds_start']} -> {v['fds_end']}  "
                  f"{'stable' if v['stable'] else 'NOT STABLE'}")
    return code


def render(raw: Path) -> int:
    """Rebuild the report of a finished run (e.g. after the report's layout changed)."""
    result: dict[str, Any] = json.loads(raw.read_text())
    result["samples"] = [Sample(s["t"], s["phase"], s["procs"]) for s in result["samples"]]
    if "envoy_outcomes" not in result:
        result["envoy_outcomes"] = envoy_outcomes(
            ROOT / ".bench" / f"soak-{result['started']}" / "state" / "logs" / "envoy-0.log")
    return finish(result, raw.resolve(), 0, docs=True)


if __name__ == "__main__":
    sys.exit(main())
