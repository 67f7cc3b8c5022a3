"""The default config's workflow wiring: the server, its token issuer, what that issuer may reach,
and that clients are never told about it."""

from __future__ import annotations

import json

from gateway.config import load_config
from gatewayctl.envoy_config import resource_metadata


def test_workflow_issuer_reaches_only_step_servers() -> None:
    """The delegated tokens' issuer is the one the server signs as; its audiences are the step
    servers' only (never /mcp, the console or the workflow server itself)."""
    cfg = load_config()
    args = cfg.server("workflow").args
    issuer = next(i for i in cfg.issuers if i.issuer == args[args.index("--delegation-issuer") + 1])
    assert issuer.algorithms == ("ES256",) and not issuer.advertise and issuer.delegation
    base = cfg.public_url.rstrip("/")
    assert set(issuer.audiences) <= {cfg.resource_url(s.name) for s in cfg.servers if s.name != "workflow"}
    assert f"{base}/mcp" not in issuer.audiences
    assert issuer.jwks_url.endswith("/" + args[args.index("--delegation-jwks") + 1].split("/")[-1])


def test_unadvertised_issuer_is_not_in_resource_metadata() -> None:
    """RFC 9728 metadata names the clients' issuers, not the workflow server's."""
    cfg = load_config()
    doc = resource_metadata(cfg, cfg.server("files"))
    assert doc["authorization_servers"] == [i.issuer for i in cfg.issuers if i.advertise]
    assert "urn:mcp-gateway:workflow" not in json.dumps(doc)
