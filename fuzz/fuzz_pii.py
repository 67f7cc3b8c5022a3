"""atheris harness: the PII masker (gateway/pii.py) on fuzzer-built text and JSON-RPC responses.

Half the inputs are text assembled from PII fragments and glue characters (random bytes alone
almost never form an email or a valid card number), half are JSON documents masked as JSON-RPC
responses. Checks: nothing raises; masked JSON encodes and keeps its shape; masking twice equals
masking once (a second pass that finds more means the first one leaked; ``FUZZ_PII_IDEMPOTENCE=0``
skips that check). Run: ``python fuzz/fuzz_pii.py -max_total_time=60``.
"""

from __future__ import annotations

import os
from typing import Any

import _common
import atheris  # type: ignore[import-untyped]  # atheris ships no type information

with atheris.instrument_imports():
    import orjson

    from gateway.pii import ALL_TYPES, Masker, mask_jsonrpc_response

MASKER = Masker(ALL_TYPES)
CHECK_IDEMPOTENCE = os.environ.get("FUZZ_PII_IDEMPOTENCE", "1") == "1"
_FRAGMENTS = [
    "john.doe@example.com", "4111 1111 1111 1111", "4111111111111111", "DE89 3704 0044 0532 0130 00",
    "123-45-6789", "+1 415 555 2671", "(415) 555-2671", "192.168.1.10", "2001:db8::1", "fe80::1%eth0",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1" * 18,
    "sk_live_" + "b" * 24, "[REDACTED:email]", " ", "-", ".", ":", "@", "_", "1", "\u00a0", "\n",
]


def _shape(before: Any, after: Any) -> None:
    if isinstance(before, dict):
        if not isinstance(after, dict) or list(after) != list(before):
            raise AssertionError("masking changed the keys of an object")
        for key in before:
            _shape(before[key], after[key])
    elif isinstance(before, list):
        if not isinstance(after, list) or len(after) != len(before):
            raise AssertionError("masking changed the length of an array")
        for b, a in zip(before, after, strict=True):
            _shape(b, a)
    elif isinstance(before, str) != isinstance(after, str):
        raise AssertionError("masking changed the type of a value")


def _text(fdp: atheris.FuzzedDataProvider) -> str:
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        if fdp.ConsumeBool():
            parts.append(fdp.PickValueInList(_FRAGMENTS))
        else:
            parts.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8)))
    return "".join(parts)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        text = _text(fdp)
        once, _ = MASKER.mask_text(text)
        if CHECK_IDEMPOTENCE:
            twice, counts = MASKER.mask_text(once)
            if counts:
                raise AssertionError(f"second pass masked more ({dict(counts)}): {text!r} -> {once!r}")
        return
    try:
        value = orjson.loads(fdp.ConsumeBytes(fdp.remaining_bytes()))
    except orjson.JSONDecodeError:
        return
    message = {"jsonrpc": "2.0", "id": 1, "result": value}
    masked, _ = mask_jsonrpc_response(message, MASKER)
    orjson.dumps(masked)
    _shape(message, masked)


if __name__ == "__main__":
    _common.run("pii", test_one_input)
