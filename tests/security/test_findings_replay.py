"""Issue 13, finding 6, through the real stack (Envoy + ext_authz + ext_proc + the pii test server,
TLS on loopback): answers replayed on a session's GET stream pass the same inspection as the
originals.

A POST answered over SSE is kept by the server for resumption; a GET with ``Last-Event-ID`` replays
its events (final result included), and the standalone GET stream carries what the server sends
outside any POST (here: progress of a call whose client accepts JSON only). Every one of those
bytes reaches the client masked with the GET caller's obligation, and a replayed ``tools/list`` is
filtered for the GET caller, whichever token of the same user made the original request.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, parse_config
from gatewayctl.envoy_config import RenderOptions, render
from tests.e2e.helpers import REPO
from tests.e2e.pii_server import CARD, EMAIL
from tests.reliability.stack import Gateway, gateway, wait_for

pytestmark = pytest.mark.timeout(180)

PROTOCOL = "2025-11-25"
CARD_DIGITS = CARD.replace(" ", "")
PATH = "/mcp/pii"
# Bounds of one read on an SSE stream that never ends by itself (the standalone stream).
READ_TIMEOUT = 15.0
MAX_LINES = 500


def pii_policy(tmp: Path) -> Path:
    """The example policy with the pii server: admins see everything unmasked, viewers may call
    ``contact`` and mask every PII type, analysts may call ``contact`` and mask cards only, the
    conformance role may call ``contact`` and masks nothing."""
    out = tmp / "replay-policies"
    out.mkdir()
    for rego in (REPO / "policies").glob("*.rego"):
        if not rego.name.endswith("_test.rego"):
            shutil.copy(rego, out / rego.name)
    data = json.loads((REPO / "policies" / "data.json").read_text(encoding="utf-8"))
    gw = data["gateway"]
    gw["servers"]["pii"] = {"tenants": ["*"]}
    gw["roles"]["admin"]["tools"]["pii"] = ["*"]
    gw["roles"]["viewer"]["tools"]["pii"] = ["contact"]
    gw["roles"]["analyst"]["tools"]["pii"] = ["contact"]
    # Masks nothing, but lists only what it may call.
    gw["roles"]["conformance"]["tools"]["pii"] = ["contact"]
    (out / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("findings-replay")
    servers = {"pii": {"module": "tests.e2e.pii_server", "count": 1}}
    overrides = {"policy": {"engine": "embedded", "dir": str(pii_policy(tmp))}}
    with gateway(tmp, servers, overrides=overrides, ext_proc=True, instances=1) as running:
        yield running


# ------------------------------------------------------------------------------ the wire

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    def events(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(id, message) of every SSE event that carries JSON."""
        return parse_events(self.raw)


def parse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        event_id, data = None, []
        for line in block.split("\n"):
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        text = "\n".join(data).strip()
        if text:
            out.append((event_id, json.loads(text)))
    return out


def event_ids(raw: bytes) -> list[str]:
    """Every event id on the stream, priming events (no data) included."""
    ids = []
    for line in raw.decode("utf-8").replace("\r\n", "\n").split("\n"):
        if line.startswith("id:"):
            ids.append(line[3:].strip())
    return ids


def leaks(raw: bytes, *values: str) -> bool:
    return any(v.encode() in raw for v in values)


class Client:
    """One MCP session over raw HTTP/1.1 (the exact bytes are what the tests judge)."""

    def __init__(self, gw: Gateway, token: str) -> None:
        self.gw = gw
        self.token = token
        self.session_id: str | None = None
        self._rid = 0

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        out = {"authorization": f"Bearer {token or self.token}",
               "mcp-protocol-version": PROTOCOL, **extra}
        if self.session_id is not None:
            out["mcp-session-id"] = self.session_id
        return out

    def post(self, method: str, params: dict[str, Any] | None = None, *,
             accept: str = "application/json, text/event-stream", notify: bool = False,
             token: str | None = None) -> Reply:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self._rid += 1
            body["id"] = self._rid
        headers = self.headers(token, **{"content-type": "application/json", "accept": accept})
        return self.send("POST", json.dumps(body).encode(), headers)

    def open(self) -> Client:
        reply = self.post("initialize", {"protocolVersion": PROTOCOL, "capabilities": {},
                                         "clientInfo": {"name": "replay-test", "version": "1"}})
        assert reply.status == 200, reply.raw
        self.session_id = reply.headers["mcp-session-id"]
        assert self.post("notifications/initialized", notify=True).status == 202
        return self

    def get(self, last_event_id: str | None, *, token: str | None = None) -> Reply:
        """A GET on the session's stream that ends with the stream (a resumption of a finished
        POST stream)."""
        headers = self.headers(token, accept="text/event-stream")
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        return self.send("GET", None, headers)

    def get_events(self, count: int, last_event_id: str | None = None, *,
                   token: str | None = None) -> Reply:
        """A GET on a stream that stays open (the standalone stream): read until ``count`` JSON
        events arrived (bounded in lines and time), then drop the connection."""
        headers = self.headers(token, accept="text/event-stream")
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        conn = self.gw.connection(timeout=READ_TIMEOUT)
        try:
            conn.request("GET", PATH, headers=headers)
            reply = conn.getresponse()
            raw = bytearray()
            if reply.status == 200:
                for _ in range(MAX_LINES):
                    line = reply.readline()
                    if not line:
                        break
                    raw += line
                    if line in (b"\n", b"\r\n") and len(parse_events(bytes(raw))) >= count:
                        break
            else:
                raw += reply.read()
            return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, bytes(raw))
        finally:
            conn.close()

    def send(self, method: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        conn = self.gw.connection(timeout=READ_TIMEOUT)
        try:
            conn.request(method, PATH, body=body, headers=headers)
            reply = conn.getresponse()
            raw = reply.read()
            return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, raw)
        finally:
            conn.close()


def ok(reply: Reply) -> Reply | None:
    """The reply, or None while the stream still has a listener (409: poll again)."""
    return None if reply.status == 409 else reply


def contact_over_sse(client: Client, token: str | None = None) -> Reply:
    """tools/call contact with a progress token: three progress events with the email, then the
    result with email and card, on a resumable SSE stream."""
    reply = client.post("tools/call", {"name": "contact", "arguments": {},
                                       "_meta": {"progressToken": "p1"}}, token=token)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert len(reply.events()) == 4, reply.raw
    return reply


def resume_points(reply: Reply) -> dict[str, str]:
    """Where a client may resume: the priming event, the first progress, a middle one, the one
    before the final result."""
    ids = event_ids(reply.raw)
    assert len(ids) == 5, ids  # priming + 3 progress + result
    return {"priming": ids[0], "first": ids[1], "middle": ids[2], "before-result": ids[3]}


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("point", ["priming", "first", "middle", "before-result"])
def test_resumed_stream_is_masked_for_a_masked_caller(gw: Gateway, point: str) -> None:
    """A viewer resuming its own call's stream at any event gets every replayed event (progress
    and the final result) masked, never the email or card number."""
    client = Client(gw, gw.token("viewer")).open()
    original = contact_over_sse(client)
    assert not leaks(original.raw, EMAIL, CARD, CARD_DIGITS)
    replay = client.get(resume_points(original)[point])
    assert replay.status == 200, replay.raw
    assert replay.headers["content-type"].startswith("text/event-stream")
    events = replay.events()
    assert events and "result" in events[-1][1]
    assert not leaks(replay.raw, EMAIL, CARD, CARD_DIGITS)
    assert b"[REDACTED:card]" in replay.raw


@pytest.mark.parametrize("point", ["priming", "middle", "before-result"])
def test_replay_of_an_unmasked_callers_answer_is_masked_for_the_replaying_caller(
        gw: Gateway, point: str) -> None:
    """The same user's admin token makes the call (PII unmasked, as admins may see it); a viewer
    token of that user resuming the stream gets it masked with the viewer's obligation."""
    admin = gw.token("admin")
    client = Client(gw, admin).open()
    original = contact_over_sse(client)
    assert leaks(original.raw, EMAIL)  # the original really carries PII
    replay = client.get(resume_points(original)[point], token=gw.token("viewer"))
    assert replay.status == 200, replay.raw
    assert replay.events() and not leaks(replay.raw, EMAIL, CARD, CARD_DIGITS)


def test_replay_masks_only_what_the_replaying_caller_must_not_see(gw: Gateway) -> None:
    """An analyst (masks cards, not email) resuming an admin's stream sees the email and never
    the card: the GET's own obligation is applied, not a fixed one."""
    client = Client(gw, gw.token("admin")).open()
    original = contact_over_sse(client)
    replay = client.get(resume_points(original)["priming"], token=gw.token("analyst"))
    assert replay.status == 200, replay.raw
    assert leaks(replay.raw, EMAIL) and not leaks(replay.raw, CARD, CARD_DIGITS)


def listed_over_sse(client: Client) -> Reply:
    original = client.post("tools/list", {"_meta": {"progressToken": "l1"}})
    assert original.status == 200 and original.headers["content-type"].startswith("text/event-stream")
    return original


@pytest.mark.parametrize("who", ["viewer", "admin-made"])
def test_replayed_tools_list_is_filtered_for_the_replaying_caller(gw: Gateway, who: str) -> None:
    """A tools/list answered over SSE and replayed to a viewer lists only what the viewer may
    call, also when the same user's admin token made the original request."""
    viewer = gw.token("viewer")
    client = Client(gw, viewer if who == "viewer" else gw.token("admin")).open()
    original = listed_over_sse(client)
    listed = {t["name"] for t in original.events()[-1][1]["result"]["tools"]}
    assert listed == ({"contact"} if who == "viewer" else {"contact", "echo"})
    for event_id in event_ids(original.raw)[:2]:  # priming, and the progress before the list
        replay = client.get(event_id, token=viewer)
        assert replay.status == 200, replay.raw
        result = replay.events()[-1][1]["result"]
        assert {t["name"] for t in result["tools"]} == {"contact"}
        assert not leaks(replay.raw, EMAIL)  # the progress message named the email


def test_unmasked_caller_gets_a_replayed_list_filtered(gw: Gateway) -> None:
    """A caller whose policy masks nothing (no reason to inspect its calls) still gets an
    admin-made tools/list filtered to what it may call when it replays it, PII unmasked."""
    client = Client(gw, gw.token("admin")).open()
    original = listed_over_sse(client)
    replay = client.get(event_ids(original.raw)[0], token=gw.token("conformance"))
    assert replay.status == 200, replay.raw
    assert {t["name"] for t in replay.events()[-1][1]["result"]["tools"]} == {"contact"}
    assert leaks(replay.raw, EMAIL)  # nothing to mask for this role


@pytest.mark.parametrize("body", [
    {"jsonrpc": "2.0", "id": 5, "method": "ping"},
    {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "echo", "arguments": {}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
], ids=["ping", "call-of-an-unmasked-tool", "notification"])
@pytest.mark.parametrize("role", ["conformance", "viewer"])
def test_get_with_a_json_rpc_body_is_refused(
        gw: Gateway, body: dict[str, Any], role: str) -> None:
    """A GET carrying a JSON-RPC body is refused (400 invalid_request) rather than authorised as
    that message: nothing of the session's replay reaches the caller."""
    client = Client(gw, gw.token("admin")).open()
    original = listed_over_sse(client)
    headers = client.headers(gw.token(role), accept="text/event-stream")
    headers["last-event-id"] = event_ids(original.raw)[0]
    headers["content-type"] = "application/json"
    reply = client.send("GET", json.dumps(body).encode(), headers)
    assert reply.status == 400, reply.raw
    assert b"echo" not in reply.raw and not leaks(reply.raw, EMAIL)


def test_standalone_stream_is_masked(gw: Gateway) -> None:
    """Progress of a call whose client accepts JSON only goes to the session's standalone GET
    stream; a viewer opening it (and resuming it mid-way) gets those events masked."""
    client = Client(gw, gw.token("admin")).open()
    viewer = gw.token("viewer")
    # The server keeps a standalone stream once a client opened it: open it, read its priming
    # event, leave (the events below are buffered for the next GET).
    assert client.get_events(0, token=viewer).status == 200
    reply = client.post("tools/call", {"name": "contact", "arguments": {},
                                       "_meta": {"progressToken": "p2"}}, accept="application/json")
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    # The server notices the first GET's disconnect on its own time (409 until then).
    stream = wait_for(lambda: ok(client.get_events(3, token=viewer)), "the standalone stream")
    assert stream.status == 200, stream.raw
    events = stream.events()
    assert len(events) == 3 and all(m.get("method") == "notifications/progress" for _, m in events)
    assert not leaks(stream.raw, EMAIL) and b"[REDACTED:email]" in stream.raw
    first_id = events[0][0]
    assert first_id is not None
    resumed = wait_for(lambda: ok(client.get_events(2, first_id, token=viewer)),
                       "the standalone stream, resumed")
    assert resumed.status == 200, resumed.raw
    assert len(resumed.events()) == 2 and not leaks(resumed.raw, EMAIL)


def test_get_streams_open_an_ext_proc_stream(gw: Gateway) -> None:
    """Every GET on a session, for an unmasked caller too, goes through ext_proc (list filtering
    of replays); a client cannot switch that off."""
    client = Client(gw, gw.token("admin")).open()
    original = contact_over_sse(client)
    before = gw.stat("http.mcp_gateway.ext_proc.streams_started")
    replay = client.get(resume_points(original)["middle"])
    assert replay.status == 200 and leaks(replay.raw, EMAIL)  # admins see PII unmasked
    assert gw.stat("http.mcp_gateway.ext_proc.streams_started") == before + 1


def test_ext_proc_admits_the_streams_of_every_server() -> None:
    """Open GET streams hold ext_proc streams: the ext_proc cluster admits as many concurrent
    requests as all server clusters together, so one server's streams cannot exhaust it."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    config = parse_config(raw, base_dir=REPO, source=str(DEFAULT_CONFIG_PATH))
    doc = yaml.safe_load(render(config, RenderOptions(ext_proc=True)))
    limits = {c["name"]: c["circuit_breakers"]["thresholds"][0]["max_requests"]
              for c in doc["static_resources"]["clusters"] if "circuit_breakers" in c}
    servers = [limits[f"mcp_{s.name}"] for s in config.servers]
    assert servers and limits["ext_proc"] >= sum(servers)
