"""ext_authz and ``mcp-gateway policy eval`` build the same policy input for the same request:
one builder (``gateway.policy.input.build_policy_input``), so what a security team evaluates
without deploying is what the gateway evaluates."""

from __future__ import annotations

import argparse
import base64
import copy
import json
from typing import Any

import aiohttp
import pytest

from gatewayctl.commands.policy import eval_input
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    Harness,
    JwksServer,
    StubEngine,
    build,
    check_request,
    make_settings,
    token_for,
)

PUBLIC_URL = "https://gw.example.test"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "read_file", "arguments": {"path": "shared/a.txt"}}}
# What only the transport knows (Envoy's request id, the peer, the listener's host and scheme)
# and the clock: everything else must be equal.
TRANSPORT_ONLY = ("id", "host", "scheme")


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession) -> Harness:
    return build(make_settings(jwks_server.url), session, StubEngine())


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    http = doc["attributes"]["request"]["http"]
    for key in TRANSPORT_ONLY:
        http.pop(key)
    doc["attributes"].pop("source")
    doc.pop("now")
    return doc


def _cli_args(*, claims: dict[str, Any], method: str, body: bytes | None,
              headers: dict[str, str], session: dict[str, Any] | None) -> argparse.Namespace:
    return argparse.Namespace(
        claims=json.dumps(claims), request=body.decode() if body is not None else None,
        method=method, session=json.dumps(session) if session is not None else None,
        header=[f"{k}:{v}" for k, v in headers.items()], server="files", input=None, now=None)


def _sent_headers(req: Any) -> dict[str, str]:
    return dict(req.attributes.request.http.headers)


@pytest.mark.parametrize("case", ["post", "post_mixed_case_headers", "get", "delete"])
async def test_ext_authz_and_policy_eval_build_the_same_input(
        authz: Harness, rsa_key: SigningKey, case: str) -> None:
    """The same request (with and without a body, with a session, mixed-case header names)
    gives the same policy input through ext_authz and through policy eval."""
    token = token_for(rsa_key)
    extra = {"mcp-method": "tools/call", "mcp-name": "read_file"}
    if case == "post_mixed_case_headers":
        extra |= {"X-Team-Header": "blue", "Accept-Language": "de"}
    if case in ("post", "post_mixed_case_headers"):
        body: bytes | None = json.dumps(CALL).encode()
        req = check_request("post_tools_call_files", token, headers=extra, body=body)
    else:
        body = None
        req = check_request("get_sse_stream" if case == "get" else "delete_session", token)
    await authz.check(req)
    through_authz = authz.engine.inputs[-1]
    assert "session" in through_authz  # every fixture names a session: bound at first use
    method = req.attributes.request.http.method
    headers = {k: v for k, v in _sent_headers(req).items() if k.lower() != "authorization"}
    args = _cli_args(claims=through_authz["token"], method=method, body=body, headers=headers,
                     session=through_authz["session"])
    through_eval = eval_input(args, PUBLIC_URL)
    assert _comparable(through_eval) == _comparable(through_authz)
    assert through_eval["attributes"]["request"]["http"]["headers"] \
        == through_authz["attributes"]["request"]["http"]["headers"]
    assert all(k == k.lower() for k in through_authz["attributes"]["request"]["http"]["headers"])


def test_policy_eval_refuses_a_body_on_get() -> None:
    """As ext_authz does, policy eval refuses a GET that carries a message."""
    args = _cli_args(claims={"sub": "a"}, method="GET", body=base64.b64decode(b"e30="),
                     headers={}, session=None)
    with pytest.raises(ValueError, match="carries no JSON-RPC message"):
        eval_input(args, PUBLIC_URL)
