"""A server's own audit trail signed and sealed like ext_authz's: `mcp-gateway audit verify
--require-signed`, `erase` and `export` cover it."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.telemetry.audit_chain import generate_signing_key
from gateway.telemetry.audit_keys import new_master_key, parse_master_key
from gatewayctl.cli import main
from mcp_servers.core import ServerSettings
from mcp_servers.core.app import add_common_arguments, settings_from_args
from tests.mcp_servers.core.conftest import start
from tests.mcp_servers.core.test_observe import stateless_call

ROOT = Path(__file__).resolve().parents[3]
MASTER = "MCP_GATEWAY_AUDIT_MASTER_KEY"


def gateway_config(tmp_path: Path) -> Path:
    """The default config with the trail, its checkpoint key and its master key under ``tmp_path``."""
    raw = yaml.safe_load((ROOT / "gateway" / "default_config.yaml").read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["secrets"] = [*raw.get("secrets", []), MASTER]
    raw["audit"] = {"dir": str(tmp_path / "audit"), "signing_key": str(tmp_path / "audit.key"),
                    "master_key": MASTER}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def cli(config: Path, *args: str) -> int:
    """`mcp-gateway --config <config> audit ...` (it runs its own event loop: off this one)."""
    return await asyncio.to_thread(main, ["--config", str(config), "audit", *args])


async def export(config: Path, sub: str) -> list[dict[str, object]]:
    out = config.parent / f"export-{sub}.jsonl"
    assert await cli(config, "export", "--sub", sub, "-o", str(out)) == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


async def test_server_trail_is_signed_sealed_and_erasable(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's entries hold no subject in clear, verify with --require-signed, export per
    subject, and erasing alice leaves none of hers readable while bob's still export."""
    master = new_master_key()
    monkeypatch.setenv(MASTER, master)
    config = gateway_config(tmp_path)
    generate_signing_key(tmp_path / "audit.key")
    path = tmp_path / "audit" / "core-test-1.jsonl"
    served = await start(ServerSettings(audit_file=str(path), audit_signing_key=str(tmp_path / "audit.key"),
                                        audit_master_key=parse_master_key(master)))
    try:
        for n, sub in enumerate(("alice", "bob", "alice")):
            body, headers = stateless_call(n, "echo", {"text": "hi"})
            headers |= {"x-mcp-user": sub, "x-mcp-tenant": "acme", "x-mcp-client-id": "cli-1",
                        "x-request-id": f"r{n}"}
            status, answer = await served.client.raw(body, headers)
            assert status == 200 and "result" in answer
    finally:
        await served.http.close()
        await served.runner.cleanup()  # closes the writer: its last checkpoint is signed
    data = path.read_bytes()
    assert data.count(b'"pii"') == 3
    # As JSON strings: a sealed blob is base64, where "bob" can occur by chance.
    for value in (b'"alice"', b'"bob"', b'"acme"', b'"cli-1"'):
        assert value not in data, value
    assert (tmp_path / "audit" / "subject-keys.sqlite").exists()
    assert await cli(config, "verify", "--require-signed") == 0
    alice = await export(config, "alice")
    assert [(e["request_id"], e["sub"], e["tenant"], e["client_id"]) for e in alice] == [
        ("r0", "alice", "acme", "cli-1"), ("r2", "alice", "acme", "cli-1")]
    assert await cli(config, "erase", "--sub", "alice") == 0
    assert await export(config, "alice") == []
    assert [(e["request_id"], e["sub"]) for e in await export(config, "bob")] == [("r1", "bob")]
    assert await cli(config, "verify", "--require-signed") == 0


def test_flags_read_the_master_key_from_the_named_variable(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--audit-master-key-env names the variable holding the key; unset or malformed, or signing
    without an audit file, is refused at start-up naming what is wrong."""
    def settings(*argv: str) -> ServerSettings:
        parser = argparse.ArgumentParser()
        add_common_arguments(parser)
        return settings_from_args(parser.parse_args(list(argv)))

    master = new_master_key()
    monkeypatch.setenv("AUDIT_MK", master)
    got = settings("--audit-file", str(tmp_path / "a.jsonl"), "--audit-master-key-env", "AUDIT_MK",
                   "--audit-signing-key", "k.pem", "--audit-checkpoint-seconds", "5",
                   "--audit-retention-days", "30")
    assert got.audit_master_key == parse_master_key(master) and master not in repr(got)
    assert (got.audit_signing_key, got.audit_checkpoint_seconds, got.audit_retention_days) == ("k.pem", 5, 30)
    assert settings("--audit-file", str(tmp_path / "a.jsonl")).audit_master_key is None
    monkeypatch.delenv("AUDIT_MK")
    with pytest.raises(ValueError, match="AUDIT_MK"):
        settings("--audit-file", str(tmp_path / "a.jsonl"), "--audit-master-key-env", "AUDIT_MK")
    monkeypatch.setenv("AUDIT_MK", "short")
    with pytest.raises(ValueError, match="audit.master_key"):
        settings("--audit-file", str(tmp_path / "a.jsonl"), "--audit-master-key-env", "AUDIT_MK")
    with pytest.raises(ValueError, match="need an audit file"):
        ServerSettings(audit_signing_key="k.pem")
