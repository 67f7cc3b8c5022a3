"""The workflow server's start-up checks and the tools it offers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.caller import Caller
from gateway.errors import RATE_LIMITED
from mcp_servers.core import ClientRequestFailed, McpError, MCPServer, ToolContext
from mcp_servers.workflow.client import StepError
from mcp_servers.workflow.engine import Engine, RunRefused
from mcp_servers.workflow.server import (
    ContextReporter,
    Runtime,
    add_arguments,
    build_server,
    register_workflow,
)
from mcp_servers.workflow.spec import load_file

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


def test_runs_per_caller_flag_is_bounded(tmp_path: Path) -> None:
    """--max-runs-per-caller takes 1..100 (default 10)."""
    assert parse(tmp_path).max_runs_per_caller == 10
    assert parse(tmp_path, "--max-runs-per-caller", "3").max_runs_per_caller == 3
    for bad in ("0", "101", "x"):
        with pytest.raises(SystemExit):
            parse(tmp_path, "--max-runs-per-caller", bad)


class _Refusing:
    def __init__(self, code: str) -> None:
        self.code = code

    async def start(self, *args: Any) -> Any:
        raise RunRefused(self.code, "no room")


class _CallerCtx:
    caller = Caller(sub="alice", issuer="https://idp")


@pytest.mark.parametrize("code", ["too_many_runs_for_caller", "too_many_runs"])
async def test_no_room_is_a_json_rpc_error(code: str) -> None:
    """A run refused for lack of room is a JSON-RPC error (RATE_LIMITED, data.reason the code),
    not a tool result."""
    server, runtime = MCPServer("workflow"), Runtime()
    runtime.engine = cast(Engine, _Refusing(code))
    register_workflow(server, runtime, load_file(REPO / "workflows" / "order_to_invoice.yaml"))
    with pytest.raises(McpError) as info:
        await server.tools["order_to_invoice"].handler(cast(ToolContext, _CallerCtx()), {})
    err = info.value.to_rpc_error()
    assert err["code"] == RATE_LIMITED and err["data"]["reason"] == code
