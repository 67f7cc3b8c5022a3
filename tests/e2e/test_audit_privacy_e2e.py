"""The running stack's audit trail with a checkpoint key and a master key: calls are audited in
signed, sealed chains (ext_authz's and the MCP servers' own); `mcp-gateway audit verify`,
`export` and `erase` work on it."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import load_config
from gatewayctl import devstack
from gatewayctl.cli import main
from tests.e2e.conftest import HAS_EXT_PROC
from tests.e2e.helpers import REPO, authz_transport, bearer, stack_config, stateless_call, wait_until

MASTER = "MCP_GATEWAY_AUDIT_MASTER_KEY"


def _pinned(stack: devstack.Stack) -> bool:
    from gateway.catalog import Catalog

    with Catalog(stack.config.catalog.path) as catalog:
        return catalog.get("whoami", "whoami") is not None


async def cli(config: Path, *args: str) -> int:
    """`mcp-gateway --config <config> audit ...` (it runs its own event loop: off this one)."""
    return await asyncio.to_thread(main, ["--config", str(config), "audit", *args])


async def _export(config: Path, sub: str, tmp: Path) -> list[dict[str, Any]]:
    out = tmp / f"{sub}.jsonl"
    assert await cli(config, "export", "--sub", sub, "-o", str(out)) == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


async def test_signed_sealed_trail_verifies_exports_and_erases(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two callers' calls land sealed in ext_authz's chain and in the MCP server's own (the dev
    stack made the signing key and the master key and handed both to each); verify
    --require-signed passes, export returns each caller's entries, erasing one makes all their
    entries unreadable, leaves the other's readable and the trail verifiable."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("*_test.rego"))
    data: dict[str, Any] = json.loads((policies / "data.json").read_text(encoding="utf-8"))
    data["gateway"]["servers"]["whoami"] = {"tenants": ["*"]}
    data["gateway"]["roles"]["admin"]["tools"]["whoami"] = ["*"]
    (policies / "data.json").write_text(json.dumps(data), encoding="utf-8")
    state = tmp_path / "state"
    path = stack_config(tmp_path, servers={"whoami": {"module": "tests.e2e.whoami_server", "count": 1}},
                        ext_authz=1, authz_transport=authz_transport(),
                        extra={"policy": {"engine": "embedded", "dir": str(policies)},
                               "secrets": [MASTER],
                               "audit": {"dir": str(state / "audit"),
                                         "signing_key": str(state / "audit-signing.key"),
                                         "master_key": MASTER}})
    monkeypatch.delenv(MASTER, raising=False)  # the dev stack generates it into state_dir/secrets
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    config = load_config(path)
    with devstack.running(config, ext_proc=HAS_EXT_PROC, startup_timeout=60.0) as stack:
        wait_until(lambda: _pinned(stack), "the catalog to pin whoami", timeout=60)
        for sub in ("alice", "bob", "alice"):
            reply = await stateless_call(stack, "whoami", bearer(config, "admin", sub=sub), "whoami")
            assert reply.status_code == 200, reply.text
    # Stopped: each writer closed its chain with a signed checkpoint.
    for pattern in ("ext_authz-*.jsonl", "whoami-*.jsonl"):
        trail = b"".join(p.read_bytes() for p in (state / "audit").glob(pattern))
        # As JSON strings: a sealed blob is base64, where "bob" can occur by chance.
        assert b'"pii"' in trail and b'"alice"' not in trail and b'"bob"' not in trail, pattern
    assert await cli(path, "verify", "--require-signed") == 0
    alice = await _export(path, "alice", tmp_path)
    # ext_authz's decision entries and the MCP server's own result entries, both opened.
    assert sorted(e["service"] for e in alice) == ["ext_authz", "ext_authz", "whoami", "whoami"]
    assert all(e["sub"] == "alice" for e in alice)
    assert await cli(path, "erase", "--sub", "alice") == 0
    assert await _export(path, "alice", tmp_path) == []
    bob = await _export(path, "bob", tmp_path)
    assert sorted(e["service"] for e in bob) == ["ext_authz", "whoami"]
    assert all(e["sub"] == "bob" for e in bob)
    assert await cli(path, "verify", "--require-signed") == 0
