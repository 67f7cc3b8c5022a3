"""The translation of 2026-07-28 requests and results for handshake-era pool children (pure)."""

from __future__ import annotations

from gateway.mcp import PROTOCOL_VERSIONS
from mcp_bridge.pool import complete, discover_from_initialize, strip_envelope


def test_envelope_keys_are_stripped_and_the_rest_kept() -> None:
    """io.modelcontextprotocol/* keys leave _meta; a progress token and other keys stay."""
    params = {"name": "echo", "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                        "io.modelcontextprotocol/clientCapabilities": {},
                                        "progressToken": 5}}
    assert strip_envelope(params) == {"name": "echo", "_meta": {"progressToken": 5}}
    bare = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}
    assert strip_envelope(bare) == {}
    assert strip_envelope({"cursor": "c"}) == {"cursor": "c"}


def test_results_become_complete_and_lists_uncacheable() -> None:
    """Results get resultType complete; list results also ttlMs 0 and a private cache scope."""
    listed = complete("tools/list")({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}})
    assert listed["result"] == {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    called = complete("tools/call")({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    assert called["result"] == {"content": [], "resultType": "complete"}
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "no"}}
    assert complete("tools/call")(error) == error


def test_discover_comes_from_the_initialize_result() -> None:
    """server/discover names the bridge's versions and the child's capabilities, info and instructions."""
    init = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "everything", "version": "2"}, "instructions": "be nice"}
    assert discover_from_initialize(init) == {
        "supportedVersions": list(PROTOCOL_VERSIONS), "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "everything", "version": "2"}, "instructions": "be nice"}
