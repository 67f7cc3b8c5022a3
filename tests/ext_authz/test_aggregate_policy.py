"""One Rego rule governs a tool on /mcp/<server> and on /mcp alike: the real engine, fed the
input ext_authz builds for each path."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import MemoryRateLimiter
from ext_authz.servicer import AuthorizationServicer
from gateway.config import PolicyConfig
from gateway.errors import FORBIDDEN
from gateway.jwks import JwksClient
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engine import PolicyEngine
from gateway.policy.factory import build_engine
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    PUBLIC_URL,
    JwksServer,
    check_request,
    denial,
    token_for,
    upstream,
)
from tests.ext_authz.test_aggregate_servicer import aggregate_settings, call, on_mcp, sealed

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
# A policy folder with one added rule: read_file of files is denied, whatever the path.
DENY_READ = """package mcp.authz

import rego.v1

default decision := {"allow": true, "reason": "allowed", "http_status": 200, "headers": {},
	"obligations": {}}

decision := {"allow": false, "reason": "read_file_denied", "http_status": 403, "headers": {},
	"obligations": {}} if {
	input.server.name == "files"
	input.mcp.tool == "read_file"
}
"""


async def _servicer(engine: PolicyEngine, jwks_url: str, session: aiohttp.ClientSession
                    ) -> AuthorizationServicer:
    settings = aggregate_settings(jwks_url)
    issuer = settings.issuers[0]
    jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536,
                      issuer=issuer.issuer)
    verifier = TokenVerifier({ISSUER: (issuer, jwks)}, settings.auth)
    return AuthorizationServicer(settings, verifier, MemoryRateLimiter(), engine)


@pytest.fixture
async def deny_read(tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    (tmp_path / "authz.rego").write_text(DENY_READ)
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_one_deny_rule_denies_both_paths(
        deny_read: PolicyEngine, jwks_server: JwksServer, session: aiohttp.ClientSession,
        rsa_key: SigningKey) -> None:
    """The rule names files/read_file: /mcp/files read_file and /mcp files__read_file are both
    refused by it; another tool through /mcp is not."""
    servicer = await _servicer(deny_read, jwks_server.url, session)
    token = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")
    direct = check_request("post_tools_call_files", token, body=call("read_file"))
    via_mcp = on_mcp(token, call("files__read_file"), sid=sealed())
    for req in (direct, via_mcp):
        status, _, body = denial(await servicer.Check(req, None))
        assert status == 403 and body["error"]["code"] == FORBIDDEN
        assert body["error"]["data"]["reason"] == "read_file_denied"
    upstream(await servicer.Check(on_mcp(token, call("files__stat"), sid=sealed()), None))


async def test_shipped_policy_rules_apply_on_both_paths(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        tmp_path: Path) -> None:
    """The shipped policy's path rule for files/read_file allows shared/ and refuses elsewhere,
    with the same reason, on /mcp/files and on /mcp."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    engine = build_engine(PolicyConfig(dir=str(folder)), reload_interval=0)
    await engine.start()
    try:
        servicer = await _servicer(engine, jwks_server.url, session)
        token = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp", roles=["viewer"],
                          scopes=["tools:call:files/*"])
        reasons = []
        for path, ok in (("shared/a.txt", True), ("secret/a.txt", False)):
            args = {"path": path}
            for req in (check_request("post_tools_call_files", token, body=call("read_file", args)),
                        on_mcp(token, call("files__read_file", args), sid=sealed())):
                resp = await servicer.Check(req, None)
                if ok:
                    upstream(resp)
                else:
                    status, _, body = denial(resp)
                    assert status == 403
                    reasons.append(body["error"]["data"]["reason"])
        assert len(reasons) == 2 and reasons[0] == reasons[1]
    finally:
        await engine.close()
