"""Issue 13, finding 4 through the real stack: a session is bound to issuer + subject + tenant.

A session opened with tenant acme (protocol 2025-06-18: initialize + notifications/initialized)
is refused to the same subject in tenant globex or without a tenant (403
session_tenant_mismatch), to the same subject of another trusted issuer and to another subject
(404 session_not_found), on POST, the GET stream and DELETE alike; the owner keeps working. A
stand-in upstream that binds nothing shows the binding is the gateway's own. Two ext_authz
processes share the bindings through Redis, so which process answers does not matter.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from gateway.catalog import Catalog
from gateway.config import load_config
from gatewayctl import devstack, tokens
from tests.e2e.helpers import authz_transport, stack_config
from tests.ports import free_port
from tests.reliability.stack import ISSUER, Gateway, _importable_tests, counter_spec, policy_dir

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (make test installs it)"),
]

ISSUER_B = "https://second-issuer.mcp-gateway.local"
VERSION = "2025-06-18"
SESSION_NOT_FOUND, FORBIDDEN = -32004, -32003
WAIT_SECONDS = 10.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)  # polling a readiness probe with a deadline
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("sessions")
    ledger = tmp / "ledger.jsonl"
    servers = {"counter": counter_spec(ledger), "echo": {"module": "tests.e2e.standin_upstream"}}
    path = stack_config(tmp, servers=servers, authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    policies = policy_dir(tmp)
    data = json.loads((policies / "data.json").read_text(encoding="utf-8"))
    data["gateway"]["servers"]["echo"] = {"tenants": ["*"]}
    data["gateway"]["roles"]["admin"]["tools"]["echo"] = ["*"]
    (policies / "data.json").write_text(json.dumps(data), encoding="utf-8")
    raw["policy"] = {"engine": "embedded", "dir": str(policies)}
    # A second trusted issuer (same dev key): a subject is unique only within its issuer.
    raw["issuers"].append({**raw["issuers"][0], "issuer": ISSUER_B})
    raw["rate_limits"] = {"backend": "redis", "redis_url": redis_url,
                          "per_user": {"rate_per_second": 1000, "burst": 1000}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    config = load_config(path)
    Catalog(config.catalog.path).close()  # see tests/reliability/stack.py (start-up race)
    stack = devstack.Stack(config)
    with _importable_tests():
        stack.start(detach=False)
    try:
        yield Gateway(stack, tmp, ledger)
    finally:
        stack.stop()


def token(gw: Gateway, *, sub: str = "alice", tenant: str | None = "acme",
          issuer: str = ISSUER) -> str:
    names = [s.name for s in gw.config.servers]
    return tokens.mint_token(devstack.signing_key(gw.config), issuer=issuer,
                             audience=[gw.config.resource_url(n) for n in names], sub=sub,
                             roles=("admin",), scopes=tuple(f"tools:call:{n}/*" for n in names),
                             tenant=tenant, ttl=600)


def send(gw: Gateway, method: str, server: str, bearer: str, body: dict[str, Any] | None = None,
         session: str | None = None, extra: list[tuple[str, str]] | None = None,
         ) -> tuple[int, dict[str, str], Any]:
    """One request; (status, headers, JSON body or None). A GET stream is not read past its
    headers."""
    conn = gw.connection(timeout=WAIT_SECONDS)
    try:
        conn.putrequest(method, f"/mcp/{server}")
        headers = [("authorization", f"Bearer {bearer}"), ("mcp-protocol-version", VERSION),
                   ("accept", "application/json, text/event-stream")]
        if session is not None:
            headers.append(("mcp-session-id", session))
        data = json.dumps(body).encode() if body is not None else b""
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        for name, value in headers + (extra or []):
            conn.putheader(name, value)
        conn.endheaders(data if body is not None else None)
        resp = conn.getresponse()
        got = {k.lower(): v for k, v in resp.getheaders()}
        if got.get("content-type", "").startswith("text/event-stream"):
            return resp.status, got, None
        text = resp.read()
        # Envoy's own refusals (bad header bytes) are plain text: no JSON-RPC body to check.
        is_json = got.get("content-type", "").startswith("application/json")
        return resp.status, got, json.loads(text) if text and is_json else None
    finally:
        conn.close()


def rpc(method: str, rid: int | None = 1, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if rid is not None:
        msg["id"] = rid
    return msg


def open_session(gw: Gateway, bearer: str) -> str:
    status, headers, body = send(gw, "POST", "counter", bearer, rpc("initialize", 0, {
        "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))
    assert status == 200, body
    sid = headers["mcp-session-id"]
    status, _, _ = send(gw, "POST", "counter", bearer, rpc("notifications/initialized", None),
                        session=sid)
    assert status == 202
    return sid


def refused(answer: tuple[int, dict[str, str], Any], status: int, reason: str) -> None:
    got, _, body = answer
    assert got == status, body
    assert body["error"]["data"]["reason"] == reason


FOREIGN = [
    pytest.param({"tenant": "globex"}, 403, "session_tenant_mismatch", id="other-tenant"),
    pytest.param({"tenant": None}, 403, "session_tenant_mismatch", id="no-tenant"),
    pytest.param({"tenant": "ACME"}, 403, "session_tenant_mismatch", id="tenant-case"),
    pytest.param({"issuer": ISSUER_B}, 404, "session_not_found", id="other-issuer"),
    pytest.param({"sub": "mallory"}, 404, "session_not_found", id="other-sub"),
    pytest.param({"sub": "alice "}, 404, "session_not_found", id="sub-trailing-space"),
]


@pytest.mark.parametrize(("who", "status", "reason"), FOREIGN)
def test_a_session_is_refused_to_anyone_but_its_owner(gw: Gateway, who: dict[str, Any],
                                                      status: int, reason: str) -> None:
    """POST, GET stream and DELETE with a foreign token are refused; the owner keeps working."""
    owner = token(gw)
    sid = open_session(gw, owner)
    foreign = token(gw, **who)
    refused(send(gw, "POST", "counter", foreign, rpc("tools/list"), session=sid), status, reason)
    refused(send(gw, "POST", "counter", foreign, rpc("tools/call", 2, {
        "name": "bump", "arguments": {"id": f"foreign-{reason}"}}), session=sid), status, reason)
    refused(send(gw, "GET", "counter", foreign, session=sid), status, reason)
    refused(send(gw, "DELETE", "counter", foreign, session=sid), status, reason)
    got, _, body = send(gw, "POST", "counter", owner, rpc("tools/list", 3), session=sid)
    assert got == 200 and "result" in body
    assert not any(line.get("id") == f"foreign-{reason}" for line in gw.ledger_lines())


def test_the_gateway_binds_sessions_for_servers_that_do_not(gw: Gateway) -> None:
    """A stand-in upstream accepts any session id; the gateway still refuses a foreign caller,
    and each of the two ext_authz processes knows the owner (shared through Redis)."""
    sid = "standin-session-7f3a"
    owner = token(gw)
    for _ in range(4):  # whichever ext_authz process answers
        got, _, body = send(gw, "POST", "echo", owner, rpc("ping"), session=sid)
        assert got == 200 and body["result"]["headers"]["x-mcp-issuer"] == ISSUER
    for _ in range(4):
        refused(send(gw, "POST", "echo", token(gw, sub="mallory"), rpc("ping"), session=sid),
                404, "session_not_found")
        refused(send(gw, "POST", "echo", token(gw, tenant="globex"), rpc("ping"), session=sid),
                403, "session_tenant_mismatch")


def test_delete_ends_the_session_for_everyone(gw: Gateway) -> None:
    """After the owner's DELETE, the id is 404 for the owner and cannot be claimed by another."""
    owner = token(gw)
    sid = open_session(gw, owner)
    got, _, _ = send(gw, "DELETE", "counter", owner, session=sid)
    assert got == 200
    for bearer in (owner, token(gw, sub="mallory")):
        got, _, body = send(gw, "POST", "counter", bearer, rpc("tools/list"), session=sid)
        assert got == 404 and body["error"]["code"] == SESSION_NOT_FOUND


@pytest.mark.parametrize("value", ["a b", "x" * 1025, "caf%C3%A9,other", "id\x7f"],
                         ids=["space", "too-long", "comma", "del"])
def test_malformed_session_ids_are_refused(gw: Gateway, value: str) -> None:
    """Ids that are not one short visible-ASCII value are 400 invalid_session_id (or refused by
    Envoy itself); never bound."""
    conn_status, _, body = send(gw, "POST", "echo", token(gw), rpc("ping"), session=value)
    assert conn_status == 400
    if body is not None:
        assert body["error"]["data"]["reason"] == "invalid_session_id"


def test_a_repeated_session_header_is_refused(gw: Gateway) -> None:
    """Two Mcp-Session-Id headers (one the victim's, one the caller's own) are refused: the
    checked id and the id an upstream reads could differ."""
    owner = token(gw)
    victim = open_session(gw, owner)
    mallory = token(gw, sub="mallory")
    got, _, body = send(gw, "POST", "counter", mallory, rpc("tools/list"), session=victim,
                        extra=[("mcp-session-id", "mallory-own")])
    assert got == 400 and body["error"]["data"]["reason"] == "invalid_session_id", body
    got, _, body = send(gw, "POST", "counter", mallory, rpc("tools/list"), session="mallory-own",
                        extra=[("Mcp-Session-Id", victim)])
    assert got == 400 and body["error"]["data"]["reason"] == "invalid_session_id", body
