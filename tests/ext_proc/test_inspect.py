"""Pure inspection decisions and transforms (no gRPC)."""

from __future__ import annotations

import pytest

from ext_proc.errors import InvalidUpstreamResponse, ListPolicyError
from ext_proc.inspect import MASK_METHODS, Inspector, SseInspector, masker_for
from ext_proc.metadata import CallerContext
from gateway.config import PolicyConfig
from gateway.policy import build_engine
from tests.e2e.helpers import REPO
from tests.ext_proc.conftest import EMAIL, TOOLS, StandinPolicy

CTX = CallerContext(mcp_method="tools/list", server="files", sub="alice", roles=("viewer",),
                    mask=("email",), decision_id="d")


def inspector(policy: StandinPolicy | None = None) -> Inspector:
    policy = policy or StandinPolicy()
    return Inspector(policy=policy, list_entrypoints={"tools": "mcp/authz/visible_tools"}, catalog=None)


def test_plans() -> None:
    """Lists filter, content methods mask when obligated, anything else does nothing."""
    ins = inspector()
    assert ins.plan(CTX).list_spec is not None
    for method in MASK_METHODS:
        plan = ins.plan(CallerContext(method, "files", "a", (), ("email",), "d"))
        assert plan.masker is not None and plan.masker.types == ("email",)
    assert not ins.plan(CallerContext("tools/call", "files", "a", (), (), "d")).inspects
    assert not ins.plan(CallerContext("ping", "files", "a", (), ("email",), "d")).inspects


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
    ctx = CallerContext("prompts/list", "files", "alice", ("viewer",), (), "d")
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
    ctx = CallerContext("tools/call", "files", "a", (), ("email",), "d")
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
        ctx = CallerContext("tools/list", "files", "alice", ("viewer",), (), "d", tenant="acme",
                            scope="tools:call:files/*")
        msg = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS, "nextCursor": "n"}}
        out, _ = await ins.transform(msg, ctx, ins.plan(ctx))
    finally:
        await engine.close()
    assert [t["name"] for t in out["result"]["tools"]] == ["read_file", "stat"]
    assert out["result"]["nextCursor"] == "n"
