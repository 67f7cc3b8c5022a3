"""Audit writer throughput and added latency per write, with group commit.

    .venv/bin/python bench/bench_audit.py [--dir DIR] [--entries N] [--concurrency 1,16,64,256]
        [--no-fsync] [--seal] [--subjects N] [--against OLD_AUDIT_PY[:OLD_AUDIT_KEYS_PY] ...]
        [--rounds N]

For each concurrency level, that many tasks each await ``writer.write(entry)`` in a loop (the way
request handlers do). Reports committed entries/s, mean batch size, and the latency a write adds
to its request (p50/p99/max), and the CPU time per entry of the whole process (event loop and
audit-io thread), both with building the entry (its timestamp; the argument digest) as a request
handler does ("cpu us/entry") and without it ("writer us/entry": the same entries built in a timed
loop of their own, subtracted). ``--no-fsync`` shows what the fsync itself costs; ``--seal`` adds a
row sealing personal fields under per-subject keys (audit.master_key; ``--subjects`` subjects,
100 by default, cycling, their keys made during the run). ``--against FILE`` (repeatable) runs
another version of gateway/telemetry/audit.py (e.g. ``git show HEAD~5:gateway/telemetry/audit.py >
/tmp/old.py``) in the same run, and ``--against FILE:KEYS_FILE`` with ``--seal`` also that version
sealing with its audit_keys.py; the versions alternate ``--rounds`` times and a summary gives each
row's median and its ratio to the first. It runs on the event loop the services run (uvloop;
``MCP_GATEWAY_EVENT_LOOP=asyncio`` for the standard library's: gateway/eventloop.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import eventloop  # noqa: E402
from gateway.telemetry import audit as current  # noqa: E402
from gateway.telemetry.audit_keys import SubjectKeyStore  # noqa: E402


def _load(path: Path, name: str = "audit_under_test") -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SUBJECTS = 100


def _entry(module: Any, n: int) -> Any:
    return module.AuditEntry(method="tools/call", server="files", target="read_file",
                             sub=f"user{n % SUBJECTS}", client_id="vscode", tenant="acme", decision="allow",
                             reason=None, status="ok", latency_ms=1.2, request_id=f"req-{n}",
                             decision_id=f"dec-{n}", args_digest=current.args_digest({"n": n}))


async def run(directory: Path, entries: int, concurrency: int, fsync: bool, module: Any = current,
              seal: bool = False, keys_module: Any = None) -> dict[str, float]:
    path = directory / f"bench-{concurrency}-{int(fsync)}.jsonl"

    class NoFsync(module.AuditWriter):  # type: ignore[misc]
        def _sync(self, fd: int) -> None:
            pass

    cls = module.AuditWriter if fsync else NoFsync
    latencies: list[float] = []
    batches = 0
    counter = iter(range(entries))
    extra: dict[str, Any] = {}
    if seal:
        store = SubjectKeyStore if keys_module is None else keys_module.SubjectKeyStore
        extra["keys"] = store(directory, os.urandom(32))
    async with cls(path, max_bytes=1 << 30, **extra) as writer:
        original = writer._append

        def counting_append(*args: Any) -> Any:
            nonlocal batches
            batches += 1
            return original(*args)

        writer._append = counting_append

        async def worker() -> None:
            for n in counter:
                entry = _entry(module, n)
                t0 = time.perf_counter()
                await writer.write(entry)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    # What building the entries cost (the same entries, no writer), to report the writer's own share.
    build = time.process_time()
    for n in range(entries):
        _entry(module, n)
    build = time.process_time() - build
    path.unlink()
    path.with_name(path.name + ".checkpoints").unlink(missing_ok=True)
    if seal:
        extra["keys"].close()
        (directory / "subject-keys.sqlite").unlink()
    latencies.sort()
    return {
        "rate": entries / elapsed,
        "batch": entries / batches,
        "p50": statistics.median(latencies) * 1e3,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
        "max": latencies[-1] * 1e3,
        "cpu_us": cpu / entries * 1e6,
        "writer_us": (cpu - build) / entries * 1e6,
    }


def main() -> None:
    global SUBJECTS
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to measure (default: tmp)")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (shows its cost; not durable)")
    parser.add_argument("--seal", action="store_true",
                        help="add a row sealing personal fields (audit.master_key)")
    parser.add_argument("--against", action="append", default=[],
                        help="another audit.py[:its audit_keys.py] to run alongside (repeatable)")
    parser.add_argument("--subjects", type=int, default=SUBJECTS, help="distinct subjects (keys) per run")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the versions this many times")
    args = parser.parse_args()
    SUBJECTS = args.subjects
    levels = [int(c) for c in args.concurrency.split(",")]
    versions: list[tuple[str, Any, bool, Any]] = [("current", current, False, None)]
    if args.seal:
        versions.append(("current+seal", current, True, None))
    others: list[tuple[str, Any, bool, Any]] = []
    for i, spec in enumerate(args.against):
        audit_py, _, keys_py = spec.partition(":")
        name = Path(audit_py).name
        old = _load(Path(audit_py), f"audit_under_test{i}")
        others.append((name, old, False, None))
        if args.seal and keys_py:
            others.append((f"{name}+seal", old, True, _load(Path(keys_py), f"keys_under_test{i}")))
    versions[:0] = others
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"dir={tmp} entries={args.entries} fsync={not args.no_fsync} seal={args.seal}"
              f" loop={eventloop.choice()}")
        print(f"{'version':>16} {'concurrency':>11} {'entries/s':>10} {'batch':>7} {'p50 ms':>8}"
              f" {'p99 ms':>8} {'max ms':>8} {'cpu us/entry':>12} {'writer us/entry':>15}")
        for c in levels:
            n = min(args.entries, 2000) if c == 1 else args.entries
            for _ in range(args.rounds):
                for name, module, seal, keys_module in versions:
                    r = eventloop.run(run(Path(tmp), n, c, not args.no_fsync, module, seal, keys_module))
                    results.setdefault((name, c), []).append(r)
                    print(f"{name:>16} {c:>11} {r['rate']:>10.0f} {r['batch']:>7.1f} {r['p50']:>8.3f}"
                          f" {r['p99']:>8.3f} {r['max']:>8.3f} {r['cpu_us']:>12.1f} {r['writer_us']:>15.1f}",
                          flush=True)
    if len(versions) > 1 or args.rounds > 1:
        print(f"\nmedian of {args.rounds} round(s); ratio to {versions[0][0]}: of the medians, and the"
              f" median of each round's ratio (paired: both ran back to back)")
        print(f"{'version':>16} {'concurrency':>11} {'cpu us/entry':>12} {'ratio':>7} {'paired':>7}"
              f" {'writer us/entry':>15} {'ratio':>7} {'paired':>7}")
        for c in levels:
            base = results[(versions[0][0], c)]
            base_cpu = statistics.median(r["cpu_us"] for r in base)
            base_writer = statistics.median(r["writer_us"] for r in base)
            for name, *_ in versions:
                rows = results[(name, c)]
                cpu = statistics.median(r["cpu_us"] for r in rows)
                writer = statistics.median(r["writer_us"] for r in rows)
                paired_cpu = statistics.median(r["cpu_us"] / b["cpu_us"]
                                               for r, b in zip(rows, base, strict=True))
                paired_writer = statistics.median(r["writer_us"] / b["writer_us"]
                                                  for r, b in zip(rows, base, strict=True))
                print(f"{name:>16} {c:>11} {cpu:>12.1f} {cpu / base_cpu - 1:>+7.1%} {paired_cpu - 1:>+7.1%}"
                      f" {writer:>15.1f} {writer / base_writer - 1:>+7.1%} {paired_writer - 1:>+7.1%}")

if __name__ == "__main__":
    main()
