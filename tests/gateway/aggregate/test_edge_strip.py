"""A client's copies of the aggregate endpoints' routing and rewrite headers are removed at
Envoy's edge, before ext_authz runs, in the config the gateway renders."""

from __future__ import annotations

from pathlib import Path

from gateway import wire
from gateway.config import load_config
from gatewayctl.envoy_config import render

ROOT = Path(__file__).resolve().parents[3]


def test_rendered_edge_strips_client_copies() -> None:
    """Each of wire.AGGREGATE_HEADERS has a removal in the rendered edge header mutation."""
    text = render(load_config(ROOT / "gateway" / "default_config.yaml"))
    for name in wire.AGGREGATE_HEADERS:
        assert f'- remove: "{name}"' in text, name
