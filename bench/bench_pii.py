"""PII masking benchmark: throughput on realistic text with and without PII, and the time to mask
a 10 KB ``tools/call`` result. Prints a markdown table.

    .venv/bin/python bench/bench_pii.py [--size-kb 100] [--repeat 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.pii import Masker, mask_mcp_result  # noqa: E402

WORDS = ("the server returned rows for customer order invoice status shipped pending refund account "
         "region quarter revenue total amount report summary query table column index latency ms "
         "request error retry timeout version build deploy cluster node pod release note item").split()
PII = ("jane.doe@example.com", "+44 20 7946 0958", "(650) 253-0000", "4111 1111 1111 1111",
       "DE89 3704 0044 0532 0130 00", "123-45-6789", "10.20.30.40", "2001:db8::8a2e:370:7334",
       "AKIAIOSFODNN7EXAMPLE", "ghp_0123456789abcdefghijklmnopqrstuvwxyz",
       "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl")


def realistic_text(size: int, *, pii_every: int | None, seed: int = 7) -> str:
    """Log/report-like prose with numbers, dates, times, versions and ids; PII every N bytes."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not security
    out: list[str] = []
    n = 0
    next_pii = pii_every or -1
    fillers: tuple[Callable[[], str], ...] = (
        lambda: str(rng.randint(0, 99999)),
        lambda: f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
        lambda: f"#{rng.randint(10**5, 10**9)}",
        lambda: f"{rng.random() * 1000:.2f}",
    )
    while n < size:
        if pii_every and n >= next_pii:
            token = rng.choice(PII)
            next_pii += pii_every
        elif rng.random() < 0.15:
            token = rng.choice(fillers)()
        else:
            token = rng.choice(WORDS)
        if rng.random() < 0.08:
            token += rng.choice((".", ",", ";", ":", "\n"))
        out.append(token)
        n += len(token) + 1
    return " ".join(out)[:size]


def timeit(fn: Callable[[], object], repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-kb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    size = args.size_kb * 1024
    masker = Masker()
    rows: list[tuple[str, str, str]] = []
    for label, every in (("prose, no PII", None), ("prose, PII every 2 KB", 2048),
                         ("prose, PII every 200 B", 200)):
        text = realistic_text(size, pii_every=every)
        t = timeit(lambda text=text: masker.mask_text(text), args.repeat)  # type: ignore[misc]
        _, counts = masker.mask_text(text)
        rows.append((f"mask_text {args.size_kb} KB, {label}",
                     f"{t * 1e3:.2f} ms ({size / t / 1e6:.1f} MB/s)", f"{sum(counts.values())} masked"))
    text_only = Masker(["email", "card"])
    text = realistic_text(size, pii_every=2048)
    t = timeit(lambda: text_only.mask_text(text), args.repeat)
    rows.append((f"mask_text {args.size_kb} KB, email+card only, PII every 2 KB",
                 f"{t * 1e3:.2f} ms ({size / t / 1e6:.1f} MB/s)", ""))
    for label, every in (("no PII", None), ("PII every 500 B", 500)):
        body = realistic_text(10 * 1024, pii_every=every, seed=3)
        result = {"content": [{"type": "text", "text": body}],
                  "structuredContent": {"rows": [{"note": body[i:i + 200]} for i in range(0, 2000, 200)]}}
        raw = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": result})

        def whole(raw: bytes = raw) -> bytes:
            msg = orjson.loads(raw)
            msg["result"], _ = mask_mcp_result(msg["result"], masker)
            return orjson.dumps(msg)

        t = timeit(whole, args.repeat * 5)
        rows.append((f"10 KB tools/call result ({len(raw)} B JSON), {label}: parse+mask+dump",
                     f"{t * 1e6:.0f} us", ""))
    print("| case | time | note |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
