"""The workflow server's start-up checks and the tools it offers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import pytest

from mcp_servers.core import ClientRequestFailed, ToolContext
from mcp_servers.workflow.client import StepError
from mcp_servers.workflow.server import ContextReporter, add_arguments, build_server

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


class _Ctx:
    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer = answer

    async def elicit(self, message: str, requested_schema: dict[str, Any]) -> dict[str, Any]:
        if self.answer is None:
            raise ClientRequestFailed("the client does not support elicitation")
        return self.answer


@pytest.mark.parametrize(("answer", "approved"), [
    ({"action": "accept", "content": {"approve": True}}, True),
    ({"action": "accept", "content": {"approve": False}}, False),
    ({"action": "accept", "content": {"approve": "yes"}}, False),
    ({"action": "decline"}, False),
    ({"action": "cancel"}, False),
])
async def test_only_an_explicit_yes_approves(answer: dict[str, Any], approved: bool) -> None:
    """An approval continues only on accept with approve: true."""
    reporter = ContextReporter(cast(ToolContext, _Ctx(answer)))
    assert await reporter.approve("go?") is approved


async def test_a_client_without_elicitation_cannot_approve() -> None:
    """No elicitation support: the approval step fails as declined, it is never skipped."""
    with pytest.raises(StepError) as info:
        await ContextReporter(cast(ToolContext, _Ctx(None))).approve("go?")
    assert info.value.reason == "declined"
