"""The aggregate endpoint's header names: the routing ones are the gateway's, the view header
is the client's own."""

from __future__ import annotations

from gateway import wire


def test_routing_and_rewrite_headers_are_gateway_owned() -> None:
    """x-mcp-route, the rewrite instruction and the id header are the gateway's; the view
    header is not (a client may narrow its own access with it)."""
    assert set(wire.AGGREGATE_HEADERS) == {wire.ROUTE_HEADER, *wire.REWRITE_HEADERS,
                                          wire.ID_JSON_HEADER}
    assert wire.VIEW_HEADER not in (*wire.AGGREGATE_HEADERS, *wire.GATEWAY_HEADERS)
    assert all(name.startswith("x-mcp-") for name in (*wire.AGGREGATE_HEADERS, wire.VIEW_HEADER))
    assert wire.AGGREGATOR_ROUTE.startswith("_")  # never a server name ([a-z][a-z0-9-]*)
