"""An independent reference for what the strict JSON parser must accept.

Written with the stdlib decoder and explicit checks, so that the Hypothesis tests and the atheris
harness (fuzz/fuzz_jsonrpc.py) compare ``gateway.jsonrpc.loads_strict`` against the written rules
rather than against itself: strict UTF-8 without BOM, no duplicate keys, no NaN/Infinity, no
number that overflows a double, no lone surrogate, containers nested at most DEFAULT_MAX_DEPTH.
"""

from __future__ import annotations

import json
import json.scanner
import math
from typing import Any

from gateway.jsonrpc import DEFAULT_MAX_DEPTH

_C_MAKE_SCANNER: Any = getattr(json.scanner, "c_make_scanner", None)
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


class _Rejected(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Rejected("duplicate key")
    return dict(pairs)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Rejected("non-finite number")
    return value


def _finite_int(text: str) -> int:
    # orjson reads integers beyond 64 bits as doubles and refuses the ones that overflow.
    if math.isinf(float(text)):
        raise _Rejected("non-finite number")
    return int(text)


def _constant(name: str) -> Any:
    raise _Rejected(name)


def _acceptable(value: Any, depth: int = 1) -> bool:
    """No lone surrogates anywhere, containers nested at most DEFAULT_MAX_DEPTH deep."""
    stack = [(value, depth)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, (dict, list)):
            if d > DEFAULT_MAX_DEPTH:
                return False
            children = list(item.items()) if isinstance(item, dict) else [(None, v) for v in item]
            for key, child in children:
                if key is not None:
                    stack.append((key, d))
                stack.append((child, d + 1))
    return True


def reference(body: bytes) -> tuple[bool, Any]:
    """What the parser should accept, written independently with the stdlib decoder."""
    if body.startswith(_BOMS):
        return False, None
    try:
        text = body.decode("utf-8")  # strict: also refuses UTF-8-encoded surrogates
    except UnicodeDecodeError:
        return False, None
    decoder = json.JSONDecoder(object_pairs_hook=_pairs, parse_float=_finite_float,
                               parse_int=_finite_int, parse_constant=_constant)
    if _C_MAKE_SCANNER is not None:
        # Always the C scanner, even where a harness swapped in the pure-Python one: that one
        # accepts "\ud30\n" as an escape (int(..., 16) tolerates whitespace), the C one does not.
        decoder.scan_once = _C_MAKE_SCANNER(decoder)  # type: ignore[attr-defined]  # set by JSONDecoder.__init__, untyped
    try:
        value = decoder.decode(text)
    except (ValueError, RecursionError):
        return False, None
    if not _acceptable(value):
        return False, None
    return True, value
