"""Audit writer throughput and added latency per write, with group commit.

    .venv/bin/python bench/bench_audit.py [--dir DIR] [--entries N] [--concurrency 1,16,64,256]
        [--no-fsync] [--seal] [--against OLD_AUDIT_PY]

For each concurrency level, that many tasks each await ``writer.write(entry)`` in a loop (the way
request handlers do). Reports committed entries/s, mean batch size, and the latency a write adds
to its request (p50/p99/max), and the CPU time per entry of the whole process (event loop and
audit-io thread). ``--no-fsync`` shows what the fsync itself costs; ``--seal`` seals personal fields
under a per-subject key (audit.master_key). ``--against FILE`` runs another version of
gateway/telemetry/audit.py (e.g. ``git show HEAD~5:gateway/telemetry/audit.py > /tmp/old.py``) in
the same run, alternating with this one, and prints both rows.
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

from gateway.telemetry import audit as current  # noqa: E402
from gateway.telemetry.audit_keys import SubjectKeyStore  # noqa: E402


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("audit_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _entry(module: Any, n: int) -> Any:
    return module.AuditEntry(method="tools/call", server="files", target="read_file", sub=f"user{n % 100}",
                             client_id="vscode", tenant="acme", decision="allow", reason=None, status="ok",
                             latency_ms=1.2, request_id=f"req-{n}", decision_id=f"dec-{n}",
                             args_digest=current.args_digest({"n": n}))


async def run(directory: Path, entries: int, concurrency: int, fsync: bool, module: Any = current,
              seal: bool = False) -> dict[str, float]:
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
        extra["keys"] = SubjectKeyStore(directory, os.urandom(32))
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to measure (default: tmp)")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (shows its cost; not durable)")
    parser.add_argument("--seal", action="store_true", help="seal personal fields (audit.master_key)")
    parser.add_argument("--against", type=Path, help="another audit.py to run alongside, for comparison")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the versions this many times")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    versions: list[tuple[str, Any, bool]] = [("current", current, args.seal)]
    if args.against:
        versions.insert(0, (args.against.name, _load(args.against), False))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"dir={tmp} entries={args.entries} fsync={not args.no_fsync} seal={args.seal}")
        print(f"{'version':>16} {'concurrency':>11} {'entries/s':>10} {'batch':>7} {'p50 ms':>8}"
              f" {'p99 ms':>8} {'max ms':>8} {'cpu us/entry':>12}")
        for c in levels:
            n = min(args.entries, 2000) if c == 1 else args.entries
            for _ in range(args.rounds):
                for name, module, seal in versions:
                    r = asyncio.run(run(Path(tmp), n, c, not args.no_fsync, module, seal))
                    print(f"{name:>16} {c:>11} {r['rate']:>10.0f} {r['batch']:>7.1f} {r['p50']:>8.3f}"
                          f" {r['p99']:>8.3f} {r['max']:>8.3f} {r['cpu_us']:>12.1f}")


if __name__ == "__main__":
    main()
