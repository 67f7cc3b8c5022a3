"""Audit writer throughput and added latency per write, with group commit.

    .venv/bin/python bench/bench_audit.py [--dir DIR] [--entries N] [--concurrency 1,16,64,256]

For each concurrency level, that many tasks each await ``writer.write(entry)`` in a loop (the way
request handlers do). Reports committed entries/s, mean batch size, and the latency a write adds
to its request (p50/p99/max). ``--no-fsync`` shows what the fsync itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.telemetry.audit import AuditEntry, AuditWriter, args_digest  # noqa: E402


class _NoFsync(AuditWriter):
    def _sync(self, fd: int) -> None:
        pass


def _entry(n: int) -> AuditEntry:
    return AuditEntry(method="tools/call", server="files", target="read_file", sub="alice",
                      client_id="vscode", tenant="acme", decision="allow", reason=None, status="ok",
                      latency_ms=1.2,
                      request_id=f"req-{n}", decision_id=f"dec-{n}", args_digest=args_digest({"n": n}))


async def run(directory: Path, entries: int, concurrency: int, fsync: bool) -> dict[str, float]:
    path = directory / f"bench-{concurrency}-{int(fsync)}.jsonl"
    cls = AuditWriter if fsync else _NoFsync
    latencies: list[float] = []
    batches = 0
    counter = iter(range(entries))
    async with cls(path, max_bytes=1 << 30) as writer:
        original = writer._append

        def counting_append(entries: list[AuditEntry]) -> list[bytes]:
            nonlocal batches
            batches += 1
            return original(entries)

        writer._append = counting_append  # type: ignore[method-assign]

        async def worker() -> None:
            for n in counter:
                entry = _entry(n)
                t0 = time.perf_counter()
                await writer.write(entry)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    path.unlink()
    latencies.sort()
    return {
        "rate": entries / elapsed,
        "batch": entries / batches,
        "p50": statistics.median(latencies) * 1e3,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
        "max": latencies[-1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to measure (default: tmp)")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (shows its cost; not durable)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"dir={tmp} entries={args.entries} fsync={not args.no_fsync}")
        print(f"{'concurrency':>11} {'entries/s':>10} {'batch':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for c in levels:
            n = min(args.entries, 2000) if c == 1 else args.entries
            r = asyncio.run(run(Path(tmp), n, c, not args.no_fsync))
            print(f"{c:>11} {r['rate']:>10.0f} {r['batch']:>7.1f} {r['p50']:>8.3f} {r['p99']:>8.3f}"
                  f" {r['max']:>8.3f}")


if __name__ == "__main__":
    main()
