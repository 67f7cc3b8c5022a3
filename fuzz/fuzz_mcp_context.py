"""atheris harness: gateway.mcp.extract_context with fuzzer-built params and headers.

The message is assembled from the fuzzer's bytes (method, typed members of params, each
SEP-2243 header either absent, equal to the body or arbitrary) so the fuzzer spends its time in
the MCP checks, not in JSON syntax. Checks: only GatewayError escapes; an Mcp-Method header that
differs from the body method is always refused. Run:
``python fuzz/fuzz_mcp_context.py -max_total_time=60``.
"""

from __future__ import annotations

from typing import Any

import _common
import atheris  # type: ignore[import-untyped]  # atheris ships no type information

with atheris.instrument_imports():
    from gateway.errors import GatewayError
    from gateway.jsonrpc import validate_message
    from gateway.mcp import META_PROTOCOL_VERSION, NAME_PARAM, PROTOCOL_VERSIONS, extract_context

_METHODS = [*NAME_PARAM, "initialize", "tools/list", "server/discover", "ping", "notifications/initialized"]
_VERSIONS = [*PROTOCOL_VERSIONS, "2025-03-26", "", "9999-12-31"]


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 8)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(8)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4 and depth < 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 5 and depth < 4:
        return {fdp.ConsumeUnicodeNoSurrogates(6): _value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if kind == 6:
        return {META_PROTOCOL_VERSION: fdp.PickValueInList(_VERSIONS)}
    if kind == 7:
        return fdp.PickValueInList(_METHODS)
    return fdp.ConsumeUnicodeNoSurrogates(16)


def _header(fdp: atheris.FuzzedDataProvider, body_value: Any) -> str | None:
    choice = fdp.ConsumeIntInRange(0, 2)
    if choice == 0:
        return None
    if choice == 1 and isinstance(body_value, str):
        return body_value
    return str(fdp.ConsumeUnicodeNoSurrogates(16))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.PickValueInList(_METHODS) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(12)
    raw: dict[str, Any] = {"jsonrpc": "2.0", "method": method or "x"}
    if fdp.ConsumeBool():
        raw["id"] = fdp.ConsumeIntInRange(0, 1000)
    if fdp.ConsumeBool():
        raw["params"] = {key: _value(fdp) for key in ("name", "uri", "arguments", "_meta",
                                                       "protocolVersion", "other") if fdp.ConsumeBool()}
    msg = validate_message(raw)
    key = NAME_PARAM.get(msg.method or "")
    headers: dict[str, str] = {}
    for name, body_value in (("mcp-method", msg.method), ("mcp-name", msg.params.get(key) if key else None),
                             ("mcp-protocol-version", fdp.PickValueInList(_VERSIONS)),
                             ("mcp-session-id", None)):
        value = _header(fdp, body_value)
        if value is not None:
            headers[name] = value
    try:
        extract_context(msg, headers)
    except GatewayError:
        return
    if "mcp-method" in headers and headers["mcp-method"] != msg.method:
        raise AssertionError(f"Mcp-Method mismatch accepted: {raw!r} {headers!r}")


if __name__ == "__main__":
    _common.run("mcp_context", test_one_input)
