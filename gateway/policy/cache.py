"""An exact cache of the results of one compiled bundle, keyed by the input the policy can see.

The engine hands rego-cpp only the input paths the policy references (``rego.input_projection``),
so the result of an entrypoint is a pure function of that pruned input and the bundle - unless
the policy calls a built-in whose result depends on something else (the clock, the network,
randomness): then the bundle gets no cache at all. The key is the entrypoint and the canonical
JSON bytes of the pruned input (orjson, keys sorted), so equal inputs share an entry whatever
their key order, and inputs that differ in anything the policy can read never do (``1`` and
``1.0``, ``true`` and ``1`` serialize differently). A cache belongs to one compiled bundle and is
dropped with it, so a new policy never sees an old result. Only successful evaluations are
stored, as rego-cpp's output text: every hit parses a fresh value, so no caller can change what
the next one gets.

Not thread-safe, and it need not be: the engine looks results up and stores them on the event
loop only (``CompiledPolicy.lookup`` / ``finish``); worker threads never touch the cache.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import orjson

# Larger inputs are evaluated without the cache: the entry bound then also bounds memory
# (~4 KiB per entry at worst, ~40 MB for the default 10000 entries, well inside a service's
# 150 MB budget; an allowed tools/call keys on ~0.5 KiB).
MAX_CACHED_INPUT_BYTES = 4 * 1024

# Built-ins whose result is not a function of input and data (OPA's non-deterministic built-ins,
# and those that read the clock when no time is passed): http.send, net.lookup_ip_addr,
# opa.runtime, time.now_ns, rand.intn, uuid.rfc4122 (every uuid.* and rand.*, to be safe),
# io.jwt.decode_verify (checks exp/nbf against the clock by default), io.jwt.encode_sign[_raw]
# (ECDSA/PSS signatures are randomized), crypto.x509.parse_and_verify_certificates[_with_options]
# (validity against the clock).
NONDETERMINISTIC_BUILTINS_RE = re.compile(
    r"(?<![A-Za-z0-9_.])("
    r"time\.now_ns|http\.send|net\.lookup_ip_addr|opa\.runtime"
    r"|rand\.[A-Za-z_][A-Za-z0-9_]*|uuid\.[A-Za-z_][A-Za-z0-9_]*"
    r"|io\.jwt\.decode_verify|io\.jwt\.encode_sign(?:_raw)?"
    r"|crypto\.x509\.parse_and_verify_certificates(?:_with_options)?"
    r")(?![A-Za-z0-9_])")

_DOT_BLANKS_RE = re.compile(r"\s*\.\s*")


def nondeterministic_builtins(codes: Iterable[str]) -> list[str]:
    """The non-deterministic built-ins named in ``codes`` (Rego without comments and strings)."""
    found: dict[str, None] = {}
    for code in codes:
        # Rego accepts blanks around the dots of a reference ("time . now_ns()").
        for m in NONDETERMINISTIC_BUILTINS_RE.finditer(_DOT_BLANKS_RE.sub(".", code)):
            found[m.group(1)] = None
    return list(found)


def _plain(value: Any) -> bool:
    """True when ``value`` holds only the JSON types the engine accepts, floats finite.

    orjson would also write what the engine refuses (datetimes, UUIDs, enums, str subclasses) and
    writes NaN and infinities as ``null``: such an input could take the key of a different,
    valid input.
    """
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return True
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or not _plain(v):
                return False
        return True
    if t is list or t is tuple:
        for v in value:
            if not _plain(v):
                return False
        return True
    if t is float:
        return math.isfinite(value)
    return False


def input_key(pruned: Any) -> bytes | None:
    """Canonical bytes of a pruned input, or None when it must not be cached.

    None for anything but plain JSON data (see ``_plain``), for what orjson will not write
    (integers beyond 64 bits, lone surrogates; the engine refuses those inputs with an error,
    which is never cached) and for inputs above MAX_CACHED_INPUT_BYTES.
    """
    if not _plain(pruned):
        return None
    try:
        key = orjson.dumps(pruned, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return None
    if len(key) > MAX_CACHED_INPUT_BYTES:
        return None
    return key


class DecisionCache:
    """A bounded LRU of (entrypoint, input key) -> rego-cpp output text."""

    __slots__ = ("_entries", "hits", "max_entries", "misses")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a decision cache holds at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, bytes]) -> str | None:
        text = self._entries.get(key)
        if text is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return text

    def put(self, key: tuple[str, bytes], text: str) -> None:
        entries = self._entries
        entries[key] = text
        entries.move_to_end(key)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
