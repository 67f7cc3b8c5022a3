"""The who-may-call-what matrix per tenant: computed for each tenant when the policy reads
input.token.tenant (console.matrix_tenants, else the tenants the policy data names), bounded in
evaluations, and shown with a tenant selector."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, parse_config
from gateway.console import matrix
from gateway.console.app import make_app
from gateway.policy.rego import CompiledPolicy, load_sources
from gatewayctl.tokens import SigningKey
from tests.console.conftest import COOKIE, PUBLIC_URL, Console, console_settings, seed_catalog
from tests.ext_authz.conftest import JwksServer

ENTRYPOINT = "mcp/authz/decision"
TOOLS = [("files", "read_file"), ("database", "query")]


def _tenant_data(policy_copy: Path) -> None:
    """files admits acme only, database acme and globex."""
    path = policy_copy / "data.json"
    data: dict[str, Any] = json.loads(path.read_text())
    data["gateway"]["servers"]["files"]["tenants"] = ["acme"]
    data["gateway"]["servers"]["database"]["tenants"] = ["acme", "globex"]
    path.write_text(json.dumps(data))


def _compiled(folder: Path) -> CompiledPolicy:
    return CompiledPolicy(load_sources(folder), [ENTRYPOINT, matrix.LIST_ENTRYPOINT])


def test_each_tenant_named_by_the_policy_gets_its_matrix(policy_copy: Path) -> None:
    """The example policy reads input.token.tenant: one matrix per tenant its data names; a
    server that does not admit a tenant denies that tenant's callers, and admits the other's."""
    _tenant_data(policy_copy)
    result = matrix.compute_all(_compiled(policy_copy), ENTRYPOINT, ["admin"], TOOLS, PUBLIC_URL)
    assert result.per_tenant and result.tenants == ["acme", "globex"] and not result.left_out
    acme, globex = result.by_tenant["acme"], result.by_tenant["globex"]
    assert acme.cells[("admin", "files", "read_file")].allow
    denied = globex.cells[("admin", "files", "read_file")]
    assert not denied.allow and denied.reason
    assert globex.cells[("admin", "database", "query")] == acme.cells[("admin", "database", "query")]


def test_configured_tenants_and_the_bound(policy_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """console.matrix_tenants replaces the data's tenants; tenants over the evaluation bound are
    left out (and named), at least one is computed."""
    _tenant_data(policy_copy)
    compiled = _compiled(policy_copy)
    result = matrix.compute_all(compiled, ENTRYPOINT, ["admin"], TOOLS, PUBLIC_URL, ["globex", "x"])
    assert result.tenants == ["globex", "x"]
    monkeypatch.setattr(matrix, "MAX_EVALUATIONS", 3)  # 1 role x 2 tools: one tenant fits
    bounded = matrix.compute_all(compiled, ENTRYPOINT, ["admin"], TOOLS, PUBLIC_URL, ["a", "b", "c"])
    assert bounded.tenants == ["a"] and bounded.left_out == ["b", "c"]


def test_a_policy_without_tenants_gets_one_matrix(tmp_path: Path) -> None:
    """A policy that never reads input.token.tenant: one matrix (the probe tenant), no selector,
    whatever tenants are configured."""
    (tmp_path / "authz.rego").write_text(
        "package mcp.authz\n\ndecision := {\"allow\": true, \"reason\": \"ok\"}\n")
    compiled = CompiledPolicy(load_sources(tmp_path), [ENTRYPOINT])
    result = matrix.compute_all(compiled, ENTRYPOINT, ["admin"], TOOLS, PUBLIC_URL, ["acme", "globex"])
    assert not result.per_tenant and result.tenants == [matrix.PROBE_TENANT]


def test_matrix_tenants_config_is_checked(tmp_path: Path) -> None:
    """console.matrix_tenants: a list of distinct printable names; anything else names the key."""
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "tls": {"cert_file": str(tmp_path / "t.pem"), "key_file": str(tmp_path / "t.key")},
        "issuers": [{"issuer": "https://idp.example.test", "jwks_url": "https://idp.example.test/j"}],
        "state_dir": str(tmp_path),
        "servers": {"files": {"module": "mcp_servers.files", "instances": [{"port": 1201}]}},
        "ext_authz": {"instances": [{"port": 1101}]}, "ext_proc": {"instances": [{"port": 1111}]},
        "console": {"instances": [{"port": 1401}], "matrix_tenants": ["acme", "globex"]},
    }
    assert parse_config(raw, base_dir=tmp_path).console.matrix_tenants == ("acme", "globex")
    for bad in (["acme", "acme"], ["has space"], [""], [1], "acme"):
        raw["console"]["matrix_tenants"] = bad
        with pytest.raises(ConfigError, match="console.matrix_tenants"):
            parse_config(raw, base_dir=tmp_path)


async def test_the_page_selects_a_tenant(tmp_path: Path, jwks: JwksServer, signing_key: SigningKey,
                                         policy_copy: Path) -> None:
    """The matrix page offers the tenants and shows the chosen one's decisions: files/read_file
    allowed to acme's viewer, denied to globex's."""
    _tenant_data(policy_copy)
    settings = console_settings(tmp_path, jwks.url, policy_dir=policy_copy)
    seed_catalog(Path(settings.catalog_path))
    server = TestServer(make_app(replace(settings, metrics_targets=())), host="127.0.0.1", port=0)
    await server.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        console = Console(server, http, settings, signing_key)
        sid, _ = await console.sign_in(["admin"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60

        async def page(query: str) -> str:
            async with http.get(console.url("/console/matrix" + query),
                                headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
                assert resp.status == 200
                return await resp.text()

        html = await page("")
        while 'id="matrix"' not in html:
            assert loop.time() < deadline, "the matrix was not computed within 60 s"
            await asyncio.sleep(0.1)
            html = await page("")
        assert re.findall(r'<option value="([^"]+)"', html) == ["acme", "globex"]

        def cell(text: str) -> str:
            match = re.search(r'<td class="(allow|deny)" title="[^"]*" data-role="viewer" '
                              r'data-tool="files/read_file"', text)
            assert match
            return match.group(1)

        assert cell(html) == "allow" and '<strong id="matrix-tenant">acme</strong>' in html
        globex = await page("?tenant=globex")
        assert '<strong id="matrix-tenant">globex</strong>' in globex and cell(globex) == "deny"
    finally:
        await http.close()
        await server.close()
