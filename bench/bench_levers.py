"""The per-call levers kept in issue 18 that live inside one function, before and after in the
same process (not a test; ``make bench`` runs it with the other micro-benchmarks).

    .venv/bin/python bench/bench_levers.py [--calls N] [--rounds R]

Each lever is timed as the code ran before it and as it runs now, in alternating rounds of N
calls (CPU time of this process; the median of the rounds):

1. The caller assertion verified by ``gateway.assertion.AssertionVerifier`` against PyJWT's
   ``jwt.decode`` with the same key, audience and issuer (what the verifier used before).
2. The argument digest of the bench's 1 KB echo arguments: one orjson call
   (``gateway.telemetry.audit.args_digest``) against the redacting walk it replaces when nothing
   can need redaction (keyed, as the audit trail computes it).
3. The policy bundle's revision read by every decision: the field set when the shipped
   ``policies/`` folder is read, against hashing the whole bundle on each read.

Prints a markdown table (``docs/benchmarks.md``, micro-benchmarks; docs/performance.md says
what each lever is).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ISSUER = "https://gateway.bench"
AUDIENCE = "https://gateway.bench/mcp/bench"


def _rounds(before: Callable[[], Any], after: Callable[[], Any], calls: int,
            rounds: int) -> tuple[float, float]:
    """Median CPU microseconds per call of each, over alternating rounds."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        order = (("before", before), ("after", after)) if r % 2 == 0 else \
            (("after", after), ("before", before))
        for label, fn in order:
            started = time.process_time()
            for _ in range(calls):
                fn()
            times[label].append((time.process_time() - started) / calls * 1e6)
    return statistics.median(times["before"]), statistics.median(times["after"])


def assertion_lever(calls: int, rounds: int) -> tuple[float, float]:
    import jwt

    from gateway.assertion import AssertionSigner, AssertionVerifier, KeyRing, StaticKeys, new_private_jwk
    from gateway.caller import Caller

    ring = KeyRing.from_jwks({"keys": [new_private_jwk()]})
    signer = AssertionSigner(ring, ISSUER)
    caller = Caller(sub="bench-user", issuer="https://idp.bench", tenant="acme", client_id="bench",
                    roles=("engineer",))
    public = ring.public_jwks()["keys"][0]
    key = jwt.PyJWK(public).key
    # Fresh assertions (a verifier refuses a replayed jti), minted ahead of the timing.
    tokens = iter([signer.mint(caller, AUDIENCE, f"d-{i}", tool="echo")
                   for i in range(calls * rounds + 1)])
    verifier = AssertionVerifier(StaticKeys(ring.public_jwks()), issuer=ISSUER, audience=AUDIENCE)
    loop = asyncio.new_event_loop()
    try:
        def ours() -> None:
            loop.run_until_complete(verifier.verify(next(tokens)))
        reused = signer.mint(caller, AUDIENCE, "d-pyjwt", tool="echo")

        def pyjwt() -> None:
            jwt.decode(reused, key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER,
                       options={"require": ["exp", "iat", "jti", "sub"]})
        # The coroutine's loop round trip is charged to ours, not to PyJWT's plain call.
        return _rounds(pyjwt, ours, calls, rounds)
    finally:
        loop.close()


def digest_lever(calls: int, rounds: int) -> tuple[float, float]:
    from bench.payloads import echo_arguments
    from gateway.telemetry.audit import DEFAULT_SECRET_KEY_PARTS, _canonical_chunks, args_digest

    arguments, key = echo_arguments(), b"k" * 32

    def walk() -> str:
        h = hmac.new(key, digestmod=hashlib.sha256)
        for chunk in _canonical_chunks(arguments, DEFAULT_SECRET_KEY_PARTS):
            h.update(chunk)
        return "hmac-sha256:" + h.hexdigest()
    if walk() != args_digest(arguments, key=key):
        raise SystemExit("the one-call digest differs from the walk's")
    return _rounds(walk, lambda: args_digest(arguments, key=key), calls, rounds)


def revision_lever(calls: int, rounds: int) -> tuple[float, float]:
    from gateway.policy.rego import load_sources

    sources = load_sources(ROOT / "policies")

    def hashed() -> str:
        h = hashlib.sha256()
        for m in sources.modules:
            h.update(m.name.encode() + b"\0" + m.source.encode() + b"\0")
        for name, text in sources.data:
            h.update(name.encode() + b"\0" + text + b"\0")
        return h.hexdigest()[:16]
    if hashed() != sources.digest:
        raise SystemExit("the stored revision differs from the bundle's hash")
    return _rounds(hashed, lambda: sources.digest, calls, rounds)


LEVERS: tuple[tuple[str, str, str, Callable[[int, int], tuple[float, float]]], ...] = (
    ("caller assertion verified (server, every call)", "PyJWT `jwt.decode`",
     "`AssertionVerifier.verify`", assertion_lever),
    ("argument digest, 1 KB echo arguments (ext_authz and server, every tools/call)",
     "redacting walk", "one orjson call", digest_lever),
    ("policy bundle revision (ext_authz, every decision)", "SHA-256 of the bundle per read",
     "set once per bundle", revision_lever),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per round (default 500)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per lever (default 6)")
    ns = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name, before, after, lever in LEVERS:
        b, a = lever(ns.calls, ns.rounds)
        rows.append({"lever": name, "before": before, "after": after, "before_us": round(b, 1),
                     "after_us": round(a, 1)})
    print(f"## Levers inside one function: before and after ({ns.rounds} alternating rounds of "
          f"{ns.calls} calls, median CPU us per call)\n")
    print("| lever | before | us | after | us | saved |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['lever']} | {r['before']} | {r['before_us']:.1f} | {r['after']} | "
              f"{r['after_us']:.1f} | {r['before_us'] - r['after_us']:.1f} us |")
    print("\nJSON " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
