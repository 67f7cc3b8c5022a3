"""Shared Hypothesis settings and strategies for the fuzz tests.

Budgets are fixed and the runs derandomized, so CI sees the same examples on every run and a
failure reproduces locally; no example database is written (``database=None``).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SLOW = settings(FUZZ, max_examples=100)

# Integers orjson can encode (it refuses anything outside 64 bits).
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
JSON_SCALARS = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)


# Cheap values of every JSON type, for members whose type is what matters.
ANY_JSON = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=8) | st.lists(st.integers(-5, 5) | st.text(max_size=3), max_size=2) \
    | st.dictionaries(st.text(max_size=3), st.integers(-5, 5) | st.text(max_size=3), max_size=2)


def json_values(max_leaves: int = 15) -> st.SearchStrategy[Any]:
    """Any JSON value Python's and orjson's encoders both accept (no surrogates, finite floats)."""
    return st.recursive(
        JSON_SCALARS,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=max_leaves,
    )


# Fragments that exercise the strict parser's edges: escapes of reserved words, lone and paired
# surrogates, non-finite and huge numbers, BOMs, invalid UTF-8, control bytes, deep nesting.
_FRAGMENTS = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\n", b"\t", b"\\",
    b'"jsonrpc"', b'"2.0"', b'"id"', b'"method"', b'"params"', b'"result"', b'"error"',
    b'"name"', b'"a"', b'"\\u0061"', b'"\\u0074ools/call"', b'"tools/call"',
    b"1", b"-0", b"0.5", b"1e400", b"-1e400", b"1e-400", b"9007199254740993", b"18446744073709551616",
    b"1" * 40, b"NaN", b"Infinity", b"-Infinity", b"true", b"false", b"null",
    b'"\\ud800"', b'"\\udc00"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\x01"', b'"\x7f"',
    b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"\xe2\x82", b"\xff", b"\x00", "é".encode(), "\u2028".encode(), b"[" * 70, b"{\"a\":" * 70,
]
json_ish_bytes = st.lists(st.sampled_from(_FRAGMENTS), max_size=30).map(b"".join)


def _escape_all(text: str) -> str:
    """A JSON string literal spelling every character as a \\uXXXX escape."""
    units = text.encode("utf-16-be")
    return '"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)) + '"'


def key_literal(key: str, escaped: bool) -> str:
    return _escape_all(key) if escaped else json.dumps(key, ensure_ascii=False)
