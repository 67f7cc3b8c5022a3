"""ext_authz's audit trail with a checkpoint key and a master key: signed, sealed, verifiable."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ext_authz.app import start_service
from gateway.telemetry import iter_audit
from gateway.telemetry.audit_chain import generate_signing_key, load_public_key
from gateway.telemetry.audit_keys import SubjectKeyStore, new_master_key, parse_master_key
from gateway.telemetry.audit_verify import verify_chain
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    JwksServer,
    McpServer,
    StubEngine,
    check_request,
    make_settings,
    token_for,
)

MASTER = "TEST_AUDIT_MASTER_KEY"


async def test_entries_are_sealed_and_checkpoints_signed(
        jwks_server: JwksServer, mcp_server: McpServer, rsa_key: SigningKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With audit.signing_key and audit.master_key, the caller is only in sealed form on disk, the
    chain verifies under the key, and the key store opens the entry."""
    master = new_master_key()
    monkeypatch.setenv(MASTER, master)
    generate_signing_key(tmp_path / "audit.key")
    settings = make_settings(jwks_server.url, files_port=mcp_server.port)
    audit = dataclasses.replace(settings.audit, dir=str(tmp_path / "audit"),
                                signing_key=str(tmp_path / "audit.key"), master_key=MASTER)
    svc = await start_service(dataclasses.replace(settings, audit=audit), StubEngine())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            await stub.Check(check_request("post_tools_call_files", token_for(rsa_key)), timeout=5)
    finally:
        await svc.stop(grace=None)
    (entry,) = iter_audit(svc.audit.path)
    assert entry["sub"] is None and entry["client_id"] is None and entry["pii"]
    store = SubjectKeyStore(tmp_path / "audit", parse_master_key(master))
    opened = store.open(entry)
    store.close()
    assert opened is not None and opened["sub"] and opened["sub"].encode() not in svc.audit.path.read_bytes()
    report = verify_chain(svc.audit.path, load_public_key(tmp_path / "audit.key"))
    assert report.ok and report.signed_checkpoints == 1, report.problem


@pytest.mark.parametrize("tool", ["read_file", "delete_file"])
async def test_logs_and_audit_never_hold_raw_arguments(
        jwks_server: JwksServer, mcp_server: McpServer, rsa_key: SigningKey, tool: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """After allowed and denied calls with distinctive argument values, neither the decision log,
    any other log record, the process's output nor the audit file contains those values."""
    caplog.set_level(logging.DEBUG)
    marker = f"zebra-{tool}-7f3a9c"
    body = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                         "params": {"name": tool, "arguments": {"path": f"/srv/{marker}", "note": marker}}})
    svc = await start_service(make_settings(jwks_server.url, files_port=mcp_server.port),
                              StubEngine(deny_tools={"delete_file"}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            await stub.Check(check_request("post_tools_call_files", token_for(rsa_key), body=body), timeout=5)
    finally:
        await svc.stop(grace=None)
    (entry,) = iter_audit(svc.audit.path)
    assert entry["target"] == tool and entry["args_digest"]  # the call was parsed and audited
    decisions = [r for r in caplog.records if r.name == "mcp_gateway.decisions"]
    assert decisions, "the decision log saw the call"
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, svc.audit.path.read_text()):
        assert marker not in text


@pytest.mark.parametrize(("redact", "cleared"), [
    (["args_digest", "client_id"], {"args_digest", "client_id"}),
    ("args_digest", {"sub", "client_id", "tenant", "target", "args_digest"}),  # malformed: all
])
async def test_policy_obligation_redacts_audit_fields(
        jwks_server: JwksServer, mcp_server: McpServer, rsa_key: SigningKey,
        redact: object, cleared: set[str]) -> None:
    """The policy's audit_redact obligation leaves the named fields out of the entry; anything but
    a list of known field names leaves out all of them."""
    engine = StubEngine(obligations={"audit_redact": redact})
    svc = await start_service(make_settings(jwks_server.url, files_port=mcp_server.port), engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            await stub.Check(check_request("post_tools_call_files", token_for(rsa_key)), timeout=5)
    finally:
        await svc.stop(grace=None)
    (entry,) = iter_audit(svc.audit.path)
    for name in ("sub", "client_id", "tenant", "target", "args_digest"):
        if name in cleared:
            assert entry[name] in (None, "[REDACTED]"), name
        else:
            assert entry[name] not in (None, "[REDACTED]"), name
