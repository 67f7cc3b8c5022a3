"""The workflow server's start-up checks and the tools it offers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mcp_servers.workflow.server import add_arguments, build_server

REPO = Path(__file__).resolve().parents[2]


def parse(tmp: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assertion-jwks")
    parser.add_argument("--assertion-issuer")
    add_arguments(parser)
    return parser.parse_args(["--workflows", str(REPO / "workflows"), "--runs-db", str(tmp / "r.db"),
                              "--delegation-key", str(tmp / "k.json"), "--delegation-issuer", "urn:wf",
                              "--delegation-jwks", str(tmp / "jwks.json"), *extra])


def test_refuses_to_start_without_the_caller_assertion(tmp_path: Path) -> None:
    """Without the gateway's signed assertion nobody says who the caller is: no start."""
    with pytest.raises(SystemExit, match="caller assertion"):
        build_server(parse(tmp_path))


def test_refuses_a_plain_http_gateway(tmp_path: Path) -> None:
    """Steps go to the gateway over https only."""
    with pytest.raises(SystemExit, match="https"):
        build_server(parse(tmp_path, "--assertion-jwks", "j", "--assertion-issuer", "http://gw"))


def test_each_workflow_is_a_tool_and_the_key_is_published(tmp_path: Path) -> None:
    """Each workflow file is a tool taking its inputs plus idempotency_key; the delegation key is
    made 0600 and its public half written where the gateway fetches it."""
    server = build_server(parse(tmp_path, "--assertion-jwks", "j", "--assertion-issuer", "https://gw"))
    tool = server.tools["order_to_invoice"]
    assert set(tool.input_schema["properties"]) == {"customer_id", "sku", "quantity", "idempotency_key"}
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
    published = json.loads((tmp_path / "jwks.json").read_text())
    assert "d" not in published["keys"][0] and published["keys"][0]["alg"] == "ES256"
