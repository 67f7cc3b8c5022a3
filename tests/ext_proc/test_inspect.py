"""Pure inspection decisions and transforms (no gRPC)."""

from __future__ import annotations

import base64

import orjson
import pytest

from ext_proc.errors import InvalidUpstreamResponse, ListPolicyError
from ext_proc.inspect import MASK_METHODS, Inspector, SseInspector, masker_for
from ext_proc.metadata import CallerContext
from gateway.caller import Caller
from gateway.config import PolicyConfig
from gateway.policy.factory import build_engine
from tests.e2e.helpers import REPO
from tests.ext_proc.conftest import EMAIL, TOOLS, StandinPolicy

CTX = CallerContext(mcp_method="tools/list", server="files", caller=Caller("alice", roles=("viewer",)),
                    mask=("email",), decision_id="d")


def inspector(policy: StandinPolicy | None = None) -> Inspector:
    policy = policy or StandinPolicy()
    return Inspector(policy=policy, list_entrypoints={"tools": "mcp/authz/visible_tools"}, catalog=None)


def test_plans() -> None:
    """Lists filter; with an obligation every other method masks; without one nothing is done;
    an answer without a method (GET stream) is decided per message by its shape."""
    ins = inspector()
    assert ins.plan(CTX).list_spec is not None
    for method in (*MASK_METHODS, "ping", "completion/complete", "initialize"):
        plan = ins.plan(CallerContext(method, "files", Caller("a"), ("email",), "d"))
        assert plan.masker is not None and plan.masker.types == ("email",) and not plan.by_shape
    assert not ins.plan(CallerContext("tools/call", "files", Caller("a"), (), "d")).inspects
    assert not ins.plan(CallerContext("ping", "files", Caller("a"), (), "d")).inspects
    masked = ins.plan(CallerContext(None, "files", Caller("a"), ("email",), "d"))
    assert masked.by_shape and masked.masker is not None and masked.list_spec is None
    unmasked = ins.plan(CallerContext(None, "files", Caller("a"), (), "d"))
    assert unmasked.by_shape and unmasked.masker is None and unmasked.inspects


def test_masker_cache() -> None:
    """The masker is compiled once per type set."""
    assert masker_for(("email", "card")) is masker_for(("email", "card"))


def test_inconsistent_config_is_refused() -> None:
    """List entrypoints without an engine, or for unknown kinds, fail at start-up."""
    with pytest.raises(ValueError):
        Inspector(policy=None, list_entrypoints={"tools": "a/b"}, catalog=None)
    with pytest.raises(ValueError):
        Inspector(policy=StandinPolicy(), list_entrypoints={"widgets": "a/b"}, catalog=None)


async def test_unlisted_kind_is_not_policy_filtered() -> None:
    """prompts/list without a configured rule keeps its items (no catalog: no pin filtering)."""
    policy = StandinPolicy()
    ctx = CallerContext("prompts/list", "files", Caller("alice", roles=("viewer",)), (), "d")
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"prompts": [{"name": "p"}, {"nameless": 1}]}}
    out, _ = await inspector(policy).transform(msg, ctx, inspector(policy).plan(ctx))
    assert out["result"]["prompts"] == [{"name": "p"}]
    assert policy.queries == []


async def test_undefined_policy_hides_everything() -> None:
    """An undefined list rule (None) shows nothing."""
    ins = inspector(StandinPolicy(answer=None))
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}}
    out, _ = await ins.transform(msg, CTX, ins.plan(CTX))
    assert out["result"]["tools"] == []


async def test_error_answer_to_a_list_passes() -> None:
    """An error answer to tools/list carries no items and passes unchanged."""
    ins = inspector()
    msg = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "nope"}}
    assert (await ins.transform(msg, CTX, ins.plan(CTX)))[0] == msg


@pytest.mark.parametrize("msg", [[1], {"result": {"tools": "x"}}, {"result": []}])
async def test_malformed_list_answer(msg: object) -> None:
    """A list answer of the wrong shape is an upstream error."""
    ins = inspector()
    with pytest.raises(InvalidUpstreamResponse):
        await ins.transform(msg, CTX, ins.plan(CTX))


@pytest.mark.parametrize("answer", ["read_file", [1], {"a": 1}])
async def test_policy_answer_shape(answer: object) -> None:
    """Only a list of strings is a valid list-filter answer."""
    ins = inspector(StandinPolicy(answer=answer))
    with pytest.raises(ListPolicyError):
        await ins.transform({"result": {"tools": TOOLS}}, CTX, ins.plan(CTX))


async def test_sse_inspector_passes_comments_and_priming_events() -> None:
    """Events without JSON data (comments, empty priming events) pass unchanged."""
    async def boom(msg: object) -> dict[str, object]:
        raise AssertionError("no data to transform")

    sse = SseInspector(boom)
    assert await sse.feed(b": keepalive\n\nid: 7\ndata:\n\n") == b": keepalive\n\nid: 7\ndata: \n\n"
    sse.close()
    assert not sse.dropped_tail


async def test_sse_inspector_masks_multiline_data() -> None:
    """A JSON message spread over several data: lines is parsed as one and re-emitted."""
    ctx = CallerContext("tools/call", "files", Caller("a"), ("email",), "d")
    ins = inspector()

    async def mask(msg: object) -> dict[str, object]:
        return (await ins.transform(msg, ctx, ins.plan(ctx)))[0]

    sse = SseInspector(mask)
    emitted = await sse.feed(b'data: {"jsonrpc": "2.0", "id": 1,\ndata: "result": {"content": '
                             b'[{"type": "text", "text": "' + EMAIL.encode() + b'"}]}}\n\n')
    assert EMAIL.encode() not in emitted and b"[REDACTED:email]" in emitted


async def test_real_policy_filters_tools() -> None:
    """With the embedded engine and policies/, a viewer sees only the tools its role grants."""
    engine = build_engine(PolicyConfig(dir=str(REPO / "policies")),
                          extra_entrypoints=("mcp/authz/visible_tools",))
    await engine.start()
    try:
        ins = Inspector(policy=engine, list_entrypoints={"tools": "mcp/authz/visible_tools"},
                        catalog=None)
        caller = Caller("alice", roles=("viewer",), tenant="acme", scope="tools:call:files/*")
        ctx = CallerContext("tools/list", "files", caller, (), "d")
        msg = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS, "nextCursor": "n"}}
        out, _ = await ins.transform(msg, ctx, ins.plan(ctx))
    finally:
        await engine.close()
    assert [t["name"] for t in out["result"]["tools"]] == ["read_file", "stat"]
    assert out["result"]["nextCursor"] == "n"


# --- issue 13, finding 6: answers replayed on a GET stream carry no method -----------------------

STREAM = CallerContext(None, "files", Caller("alice", roles=("viewer",)), ("email",), "d")
STREAM_UNMASKED = CallerContext(None, "files", Caller("alice", roles=("viewer",)), (), "d")


async def by_shape(msg: object, ctx: CallerContext = STREAM,
                   policy: StandinPolicy | None = None) -> dict[str, object]:
    ins = inspector(policy)
    return (await ins.transform(msg, ctx, ins.plan(ctx)))[0]


@pytest.mark.parametrize("ctx", [STREAM, STREAM_UNMASKED], ids=["masked", "unmasked"])
async def test_replayed_tools_list_is_filtered(ctx: CallerContext) -> None:
    """A tools/list result replayed without its method is filtered as tools/list, with or
    without a mask obligation; other keys stay."""
    policy = StandinPolicy()
    out = await by_shape({"jsonrpc": "2.0", "id": 3, "result": {"tools": TOOLS, "nextCursor": "c"}},
                         ctx, policy)
    result = out["result"]
    assert isinstance(result, dict)
    assert [t["name"] for t in result["tools"]] == ["read_file", "stat"]
    assert result["nextCursor"] == "c" and len(policy.queries) == 1


@pytest.mark.parametrize("key", ["tools", "prompts", "resources", "resourceTemplates"])
async def test_every_list_kind_is_recognised(key: str) -> None:
    """Each list kind is filtered by its key: unnamed items go, the policy rule of that kind
    (if configured) is asked."""
    ident = {"resources": "uri", "resourceTemplates": "uriTemplate"}.get(key, "name")
    items = [{ident: "read_file"}, {ident: "write_file"}, {"nameless": EMAIL}]
    out = await by_shape({"result": {key: items}}, STREAM_UNMASKED)
    result = out["result"]
    assert isinstance(result, dict)
    expected = ["read_file"] if key == "tools" else ["read_file", "write_file"]
    assert [i[ident] for i in result[key]] == expected


async def test_several_lists_in_one_result_are_all_filtered() -> None:
    """A result that names two list kinds cannot slip one of them past the filter."""
    out = await by_shape({"result": {"prompts": [{"x": 1}], "tools": TOOLS}}, STREAM_UNMASKED)
    result = out["result"]
    assert isinstance(result, dict)
    assert result["prompts"] == [] and [t["name"] for t in result["tools"]] == ["read_file", "stat"]


@pytest.mark.parametrize("value", ["read_file", {"0": TOOLS[1]}, None, 3])
async def test_list_key_of_another_shape_fails_closed(value: object) -> None:
    """A list name holding something other than an array can be neither filtered nor trusted."""
    with pytest.raises(InvalidUpstreamResponse):
        await by_shape({"result": {"tools": value}}, STREAM_UNMASKED)


@pytest.mark.parametrize("msg", [
    {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": EMAIL}]}},
    {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "x"}],
                                           "structuredContent": {"who": EMAIL}}},
    {"jsonrpc": "2.0", "id": 1, "result": {"contents": [{"uri": "f://a", "text": EMAIL}]}},
    {"jsonrpc": "2.0", "id": 1, "result": {"messages": [{"role": "user", "content":
                                                         {"type": "text", "text": EMAIL}}]}},
    {"jsonrpc": "2.0", "id": 1, "result": {"completion": {"values": [EMAIL]}}},
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": EMAIL, "data": [EMAIL]}},
    {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": EMAIL}},
    {"jsonrpc": "2.0", "method": "notifications/progress",
     "params": {"progressToken": 1, "progress": 1, "message": f"at {EMAIL}"}},
    {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage",
     "params": {"messages": [{"role": "user", "content": {"type": "text", "text": EMAIL}}],
                "tools": [{"name": EMAIL}]}},
    {"jsonrpc": "2.0", "id": "s2", "method": "elicitation/create", "params": {"message": EMAIL}},
    {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "read_file", "description": EMAIL}],
                                           "content": [{"type": "text", "text": EMAIL}]}},
], ids=["call", "structured", "read", "prompt", "completion", "error", "log", "progress",
        "sampling", "elicitation", "list-and-content"])
async def test_every_replayed_message_is_masked(msg: dict[str, object]) -> None:
    """Results of any shape, errors, and notification / server-request params replayed on a GET
    stream are masked with the caller's obligation; no list result escapes it either."""
    out = await by_shape(msg)
    text = orjson.dumps(out).decode()
    assert EMAIL not in text and "[REDACTED:email]" in text


async def test_replayed_message_unmasked_without_obligation() -> None:
    """Without a mask obligation a replayed non-list message passes unchanged."""
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": EMAIL}]}}
    assert await by_shape(msg, STREAM_UNMASKED) == msg


async def test_replayed_base64_payloads_are_left_alone() -> None:
    """Binary payloads (image data, non-text blobs) are never scanned as text, so a replay
    cannot corrupt them; a text blob is decoded and masked as on the original answer."""
    noise = "AB12CDEFGHIJKLMNOPQRS+1234567/"  # shaped like an IBAN and a phone run
    text_blob = base64.b64encode(EMAIL.encode()).decode()
    msg = {"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "image", "data": noise, "mimeType": "image/png"}],
        "contents": [{"uri": "f://b", "blob": noise, "mimeType": "application/octet-stream"},
                     {"uri": "f://t", "blob": text_blob, "mimeType": "text/plain"}],
        "_meta": {"owner": EMAIL}}}
    out = await by_shape(msg, CallerContext(None, "files", Caller("a"), ("all",), "d"))
    result = out["result"]
    assert isinstance(result, dict)
    assert result["content"][0]["data"] == noise and result["contents"][0]["blob"] == noise
    assert EMAIL not in base64.b64decode(result["contents"][1]["blob"]).decode()
    assert result["_meta"] == {"owner": "[REDACTED:email]"}


@pytest.mark.parametrize("method", ["tools/call", "resources/read", "prompts/get", None])
async def test_strings_outside_the_content_fields_are_masked(method: str | None) -> None:
    """A result's _meta, a block's annotations and keys next to the MCP content fields are
    masked too, on an original answer as on a replay."""
    ctx = CallerContext(method, "files", Caller("a"), ("email",), "d")
    msg = {"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "text", "text": "ok", "annotations": {"note": EMAIL}}],
        "contents": [{"uri": "f://a", "text": "ok", "_meta": {"owner": EMAIL}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": EMAIL}]}],
        "_meta": {"by": EMAIL}, "extra": [EMAIL]}}
    ins = inspector()
    out, counts = await ins.transform(msg, ctx, ins.plan(ctx))
    assert EMAIL not in orjson.dumps(out).decode() and counts["email"] == 5
