"""The engine against a stand-in gateway on a real loopback port: order, references, delegated
tokens, compensation, approvals, retries, idempotency keys and recovery after a stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.caller import Caller
from mcp_servers.workflow.client import GatewayClient
from mcp_servers.workflow.delegation import Delegator, caller_record, load_or_create_key, principal
from mcp_servers.workflow.engine import Answer, Engine, RunRefused
from mcp_servers.workflow.spec import Workflow, parse_workflow
from mcp_servers.workflow.store import (
    FAILED,
    STEP_COMPENSATED,
    STEP_DONE,
    STEP_RUNNING,
    STEP_UNKNOWN,
    SUCCEEDED,
    RunStore,
)
from tests.workflow.gateway_standin import Script, Standin, standin_gateway

ISSUER = "urn:test:workflow"
SCOPE = "tools:call:erp/* tools:call:files/write_file tools:call:database/query openid"
ALICE = Caller(sub="alice", issuer="https://idp", tenant="acme", client_id="cli", roles=("engineer",),
               scope=SCOPE, expires=int(time.time()) + 3600)

WORKFLOW: dict[str, Any] = {
    "name": "order", "description": "d",
    "input_schema": {"type": "object", "properties": {"customer": {"type": "integer"}}},
    "steps": [
        {"id": "create", "server": "erp", "tool": "createOrder",
         "arguments": {"customer_id": "${inputs.customer}"},
         "compensate": {"server": "erp", "tool": "cancelOrder",
                        "arguments": {"order_id": "${steps.create.output.id}"}}},
        {"id": "export", "server": "files", "tool": "write_file",
         "arguments": {"path": "inv-${steps.create.output.id}.json", "content": "${steps.create.output}"},
         "compensate": {"server": "files", "tool": "write_file",
                        "arguments": {"path": "inv-${steps.create.output.id}.json", "content": "void"}}},
        {"id": "record", "server": "database", "tool": "query", "idempotent": True, "retries": 2,
         "arguments": {"sql": "SELECT 1", "params": ["${steps.create.output.id}"]}},
    ]}


class Recorder:
    def __init__(self, approve: bool = True) -> None:
        self.events: list[tuple[float, float, str]] = []
        self.asked: list[str] = []
        self._approve = approve

    async def progress(self, progress: float, total: float, message: str) -> None:
        self.events.append((progress, total, message))

    async def approve(self, message: str) -> bool:
        self.asked.append(message)
        return self._approve


class Harness:
    def __init__(self, tmp: Path, standin: Standin, workflow: Workflow) -> None:
        self.ring = load_or_create_key(tmp / "key.json")
        self.store = RunStore(tmp / "runs.sqlite3")
        self.client = GatewayClient(standin.url, None)
        self.standin = standin
        self.workflow = workflow
        self.engine = Engine({workflow.name: workflow}, self.store, self.client,
                             Delegator(self.ring, ISSUER, standin.url), retry_backoff=0.01,
                             recovery_seconds=2)

    async def run(self, inputs: dict[str, Any], key: str | None = None, reporter: Recorder | None = None,
                  caller: Caller = ALICE) -> Answer:
        return await self.engine.start(self.workflow, caller, inputs, key, reporter or Recorder())


async def harness(tmp: Path, script: Script, workflow: dict[str, Any] = WORKFLOW) -> AsyncIterator[Harness]:
    ring = load_or_create_key(tmp / "key.json")
    async with standin_gateway(ring, ISSUER, script) as standin:
        h = Harness(tmp, standin, parse_workflow(workflow, "t.yaml"))
        await h.client.open()
        try:
            yield h
        finally:
            await h.client.close()
            h.store.close()


def created(args: dict[str, Any]) -> tuple[Any, ...]:
    return ("ok", {"id": 7, "customer_id": args["customer_id"]})


@pytest.fixture
async def ok(tmp_path: Path) -> AsyncIterator[Harness]:
    async for h in harness(tmp_path, {("erp", "createOrder"): created}):
        yield h


async def test_success_threads_outputs_and_acts_as_the_caller(ok: Harness) -> None:
    """Steps run in order with earlier outputs as arguments, each with a token for the caller
    scoped to that one server and tool; progress is reported per step."""
    rec = Recorder()
    answer = await ok.run({"customer": 3}, reporter=rec)
    assert not answer.is_error and answer.structured["status"] == SUCCEEDED
    assert ok.standin.tools() == ["erp/createOrder", "files/write_file", "database/query"]
    assert ok.standin.calls[1][2] == {"path": "inv-7.json", "content": {"id": 7, "customer_id": 3}}
    claims = ok.standin.calls[1][3]
    assert (claims["sub"], claims["tenant"], claims["roles"], claims["client_id"]) == \
        ("alice", "acme", ["engineer"], "cli")
    assert claims["scope"] == "tools:call:files/write_file openid"
    assert claims["act"]["sub"] == "mcp-gateway-workflow"
    assert claims["exp"] - claims["iat"] <= 60
    assert [e[0] for e in rec.events] == [0, 1, 1, 2, 2, 3]
    assert answer.structured["output"]["create"] == {"id": 7, "customer_id": 3}


async def test_a_step_needs_the_callers_own_scope(tmp_path: Path) -> None:
    """A caller whose token lacks the step's tool scope is refused at that step before any call
    (the workflow does not grant it); the error names the missing scope."""
    narrow = Caller(sub="alice", issuer="https://idp", roles=("engineer",),
                    scope="tools:call:workflow/order", expires=ALICE.expires)
    async for h in harness(tmp_path, {("erp", "createOrder"): created}):
        answer = await h.run({"customer": 1}, caller=narrow)
        s = answer.structured
        assert (s["failed_step"], s["reason"]) == ("create", "refused")
        assert s["detail"] == {"reason": "insufficient_scope",
                               "missing_scope": "tools:call:erp/createOrder"}
        assert "tools:call:erp/createOrder" in answer.text and h.standin.calls == []
        assert "outcome_unknown" not in s


async def test_a_compensation_needs_the_callers_scope_too(tmp_path: Path) -> None:
    """A compensation whose tool the caller may not call is not undone, naming the scope."""
    caller = Caller(sub="alice", issuer="https://idp", roles=("engineer",),
                    scope="tools:call:erp/createOrder tools:call:files/write_file",
                    expires=ALICE.expires)
    async for h in harness(tmp_path, {("erp", "createOrder"): created}):
        s = (await h.run({"customer": 1}, caller=caller)).structured
        assert s["failed_step"] == "record" and s["undone"] == ["export"]
        assert s["not_undone"][0]["step"] == "create"
        assert "tools:call:erp/cancelOrder" in s["not_undone"][0]["error"]
        assert "erp/cancelOrder" not in h.standin.tools()


async def test_step_tokens_expire_with_the_callers_token(tmp_path: Path) -> None:
    """A step's token lives no longer than the caller's own token; an expired caller's step is
    refused before the call."""
    soon = Caller(sub="alice", issuer="https://idp", roles=("engineer",), scope=SCOPE,
                  expires=int(time.time()) + 20)
    async for h in harness(tmp_path, {("erp", "createOrder"): created}):
        assert not (await h.run({"customer": 1}, caller=soon)).is_error
        assert all(c[3]["exp"] <= soon.expires for c in h.standin.calls)
    gone = Caller(sub="alice", issuer="https://idp", roles=("engineer",), scope=SCOPE,
                  expires=int(time.time()) - 1)
    async for h in harness(tmp_path / "b", {("erp", "createOrder"): created}):
        s = (await h.run({"customer": 1}, caller=gone)).structured
        assert (s["failed_step"], s["detail"]["reason"]) == ("create", "caller_token_expired")
        assert h.standin.calls == []


def test_compensation_tokens_are_not_capped_and_say_so(tmp_path: Path) -> None:
    """A compensation's token lives its own 60 s even past the caller's expiry (undoing is the
    caller's interest) and is marked act.compensation for the policy."""
    ring = load_or_create_key(tmp_path / "key.json")
    gone = Caller(sub="alice", issuer="https://idp", roles=("engineer",), scope=SCOPE,
                  expires=int(time.time()) - 100)
    token = Delegator(ring, ISSUER, "https://gw").token(gone, "erp", "cancelOrder", workflow="w",
                                                       run_id="r", compensation=True)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60 and claims["act"]["compensation"] is True
    assert claims["caller_iss"] == "https://idp"


async def test_last_step_failure_compensates_in_reverse(tmp_path: Path) -> None:
    """A failed last step undoes the earlier steps last-first; the answer names the failed step
    and what was undone."""
    script: Script = {("erp", "createOrder"): created,
                      ("database", "query"): lambda a: ("tool_error", "no such table")}
    async for h in harness(tmp_path, script):
        answer = await h.run({"customer": 3})
        assert answer.is_error
        s = answer.structured
        assert (s["failed_step"], s["reason"], s["undone"], s["not_undone"]) == \
            ("record", "tool_error", ["export", "create"], [])
        assert h.standin.tools()[-2:] == ["files/write_file", "erp/cancelOrder"]
        assert h.standin.calls[-1][2] == {"order_id": 7}
        assert "failed at step record" in answer.text and "undone: export, create" in answer.text
        run = h.store.get(s["run_id"])
        assert run is not None and run.status == FAILED
        assert h.store.steps(run.id)["create"].status == STEP_COMPENSATED


async def test_refusal_stops_at_that_step(tmp_path: Path) -> None:
    """A step the gateway refuses (403) is where the run stops; later steps never run."""
    script: Script = {("erp", "createOrder"): created,
                      ("files", "write_file"): lambda a: ("http", 403, "tool_not_allowed")}
    async for h in harness(tmp_path, script):
        answer = await h.run({"customer": 3})
        s = answer.structured
        assert (s["failed_step"], s["reason"], s["undone"]) == ("export", "refused", ["create"])
        assert s["detail"]["reason"] == "tool_not_allowed"
        assert "database/query" not in h.standin.tools()


async def test_failed_compensation_is_reported(tmp_path: Path) -> None:
    """A compensation that fails is listed as not undone, with its error."""
    script: Script = {("erp", "createOrder"): created,
                      ("erp", "cancelOrder"): lambda a: ("tool_error", "already shipped"),
                      ("files", "write_file"): lambda a: ("tool_error", "disk full")}
    async for h in harness(tmp_path, script):
        s = (await h.run({"customer": 3})).structured
        assert s["undone"] == [] and s["not_undone"][0]["step"] == "create"
        assert "already shipped" in s["not_undone"][0]["error"]


async def test_only_idempotent_steps_are_retried(tmp_path: Path) -> None:
    """A 503 is retried for the idempotent step, not for a non-idempotent one."""
    count = {"n": 0}

    def flaky(args: dict[str, Any]) -> tuple[Any, ...]:
        count["n"] += 1
        return ("http", 503, "unavailable") if count["n"] == 1 else ("ok", {"rows": []})
    async for h in harness(tmp_path, {("erp", "createOrder"): created, ("database", "query"): flaky}):
        assert not (await h.run({"customer": 1})).is_error
        assert h.standin.tools().count("database/query") == 2
    async for h in harness(tmp_path / "b", {("erp", "createOrder"): lambda a: ("http", 503, "x")}):
        s = (await h.run({"customer": 1})).structured
        assert s["reason"] == "unavailable" and h.standin.tools() == ["erp/createOrder"]


async def test_timeout_leaves_the_outcome_unknown(tmp_path: Path) -> None:
    """A step with no answer within its timeout fails and is reported as of unknown outcome."""
    wf = {**WORKFLOW, "steps": [{**WORKFLOW["steps"][0], "timeout_seconds": 0.3}]}
    async for h in harness(tmp_path, {("erp", "createOrder"): lambda a: ("hang",)}, wf):
        s = (await h.run({"customer": 1})).structured
        assert s["reason"] == "timeout" and s["outcome_unknown"] == ["create"]


async def test_large_answer_in_chunks_is_a_success(tmp_path: Path) -> None:
    """A step whose JSON answer arrives in many 16 KB chunks succeeds and its output is used."""
    script: Script = {("erp", "createOrder"): lambda a: ("chunked", {"id": 7, "pad": "x" * 300_000},
                                                         16 * 1024)}
    async for h in harness(tmp_path, script):
        s = (await h.run({"customer": 1})).structured
        assert s["status"] == SUCCEEDED and s["output"]["create"]["id"] == 7
        assert h.standin.calls[1][2]["path"] == "inv-7.json"


async def test_answer_lost_after_sending_is_an_unknown_outcome(tmp_path: Path) -> None:
    """A 502 without an answer for a non-idempotent step: the run says the step may have taken
    effect (answer, text and run record), not that it failed cleanly."""
    async for h in harness(tmp_path, {("erp", "createOrder"): lambda a: ("plain", 502)}):
        answer = await h.run({"customer": 1})
        s = answer.structured
        assert (s["failed_step"], s["reason"], s["outcome_unknown"]) == \
            ("create", "unavailable", ["create"])
        assert "outcome unknown: create" in answer.text and "may have taken effect" in s["error"]
        assert h.store.steps(s["run_id"])["create"].status == STEP_UNKNOWN


async def test_output_not_matching_its_schema_is_never_used(tmp_path: Path) -> None:
    """An output that breaks the step's output_schema (an id aimed at another path) fails the step:
    no later step and not its own compensation uses it; the step is of unknown outcome."""
    wf = {**WORKFLOW, "steps": [{**WORKFLOW["steps"][0], "output_schema": {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}},
        *WORKFLOW["steps"][1:]]}
    script: Script = {("erp", "createOrder"): lambda a: ("ok", {"id": "../../etc/x"})}
    async for h in harness(tmp_path, script, wf):
        answer = await h.run({"customer": 1})
        s = answer.structured
        assert (s["failed_step"], s["reason"], s["outcome_unknown"]) == \
            ("create", "bad_output", ["create"])
        assert "output.id" in s["error"] and s["undone"] == []
        assert h.standin.tools() == ["erp/createOrder"]
        assert h.store.steps(s["run_id"])["create"].status == STEP_UNKNOWN


async def test_declined_approval_stops_and_compensates(tmp_path: Path) -> None:
    """An approval answered no stops the run before the next step and undoes the earlier ones."""
    wf = {**WORKFLOW, "steps": [WORKFLOW["steps"][0],
                                {"id": "ok", "approval": {"message": "order ${steps.create.output.id}?"}},
                                {**WORKFLOW["steps"][1], "depends_on": ["ok"]}]}
    async for h in harness(tmp_path, {("erp", "createOrder"): created}, wf):
        rec = Recorder(approve=False)
        s = (await h.run({"customer": 1}, reporter=rec)).structured
        assert rec.asked == ["order 7?"]
        assert (s["failed_step"], s["reason"], s["undone"]) == ("ok", "declined", ["create"])
        assert "files/write_file" not in h.standin.tools()


async def test_idempotency_key_runs_once_per_caller(ok: Harness) -> None:
    """The same key twice runs once and answers the same; other inputs conflict; another caller's
    key is their own."""
    first = await ok.run({"customer": 3}, key="k1")
    again = await ok.run({"customer": 3}, key="k1")
    assert again == first and ok.standin.tools().count("erp/createOrder") == 1
    with pytest.raises(RunRefused) as info:
        await ok.run({"customer": 4}, key="k1")
    assert info.value.code == "idempotency_key_reused"
    bob = Caller(sub="bob", issuer="https://idp", tenant="acme", roles=("engineer",), scope=SCOPE,
                 expires=ALICE.expires)
    other = await ok.run({"customer": 3}, key="k1", caller=bob)
    assert other.structured["run_id"] != first.structured["run_id"]
    assert ok.standin.tools().count("erp/createOrder") == 2


async def test_client_leaving_does_not_cancel_the_run(tmp_path: Path) -> None:
    """A cancelled request leaves its run going: it finishes and its key answers later."""
    gate = asyncio.Event()

    def slow(args: dict[str, Any]) -> tuple[Any, ...]:
        gate.set()
        return ("ok", {"id": 7})
    async for h in harness(tmp_path, {("erp", "createOrder"): slow}):
        task = asyncio.create_task(h.run({"customer": 1}, key="k"))
        await asyncio.wait_for(gate.wait(), 10)
        task.cancel()
        await h.engine.drain()
        answer = await h.run({"customer": 1}, key="k")
        assert answer.structured["status"] == SUCCEEDED


async def test_recovery_compensates_an_interrupted_run(tmp_path: Path) -> None:
    """A run a stopped server left with one step done and one running is compensated at the next
    start; the running step is reported as of unknown outcome."""
    async for h in harness(tmp_path, {("erp", "createOrder"): created}):
        run, _ = h.store.create("order", principal(ALICE), "k", caller_record(ALICE), {"customer": 3})
        h.store.set_step(run.id, "create", STEP_DONE, output={"id": 9})
        h.store.set_step(run.id, "export", STEP_RUNNING, attempt=True)
        assert await h.engine.recover() == 1
        assert h.standin.tools() == ["erp/cancelOrder"] and h.standin.calls[0][2] == {"order_id": 9}
        assert h.standin.calls[0][3]["sub"] == "alice"
        again = await h.run({"customer": 3}, key="k")
        s = again.structured
        assert (s["failed_step"], s["reason"], s["undone"], s["outcome_unknown"]) == \
            ("export", "interrupted", ["create"], ["export"])
        assert h.store.unfinished() == []


async def test_recovery_compensates_after_the_callers_token_expired(tmp_path: Path) -> None:
    """Recovery undoes an interrupted run with the stored caller even when the caller's token has
    expired since (undoing is the caller's interest, docs/workflows.md); the token is marked as a
    compensation's and still scoped to the one tool."""
    expired = Caller(sub="alice", issuer="https://idp", roles=("engineer",), scope=SCOPE,
                     expires=int(time.time()) - 3600)
    async for h in harness(tmp_path, {}):
        run, _ = h.store.create("order", principal(expired), None, caller_record(expired), {"customer": 3})
        h.store.set_step(run.id, "create", STEP_DONE, output={"id": 9})
        h.store.set_step(run.id, "export", STEP_RUNNING, attempt=True)
        assert await h.engine.recover() == 1
        assert h.standin.tools() == ["erp/cancelOrder"]
        claims = h.standin.calls[0][3]
        assert claims["act"]["compensation"] is True and claims["exp"] > time.time()
        assert claims["scope"] == "tools:call:erp/cancelOrder openid"


async def test_recovery_completes_a_run_whose_steps_all_finished(ok: Harness) -> None:
    """A run interrupted after its last step is completed, not undone."""
    run, _ = ok.store.create("order", principal(ALICE), None, caller_record(ALICE), {"customer": 3})
    for sid in ("create", "export", "record"):
        ok.store.set_step(run.id, sid, STEP_DONE, output={"id": 1})
    await ok.engine.recover()
    rec = ok.store.get(run.id)
    assert rec is not None and rec.status == SUCCEEDED and ok.standin.calls == []


async def test_runs_at_once_are_bounded(ok: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the limit of runs in progress a new run is refused before anything is recorded."""
    import mcp_servers.workflow.engine as engine_module
    monkeypatch.setattr(engine_module, "MAX_RUNS", 0)
    with pytest.raises(RunRefused) as info:
        await ok.run({"customer": 1}, key="k")
    assert info.value.code == "too_many_runs" and ok.store.unfinished() == []
    assert ok.store.find("order", principal(ALICE), "k") is None


class Gate(Recorder):
    """Approvals that wait until the test opens the gate."""

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate

    async def approve(self, message: str) -> bool:
        self.asked.append(message)
        await self.gate.wait()
        return True


async def test_one_caller_cannot_take_every_run_slot(tmp_path: Path) -> None:
    """Past --max-runs-per-caller runs in progress, that caller's next run is refused before
    anything is recorded; another caller still runs, and the slot frees when a run ends."""
    wf = {**WORKFLOW, "steps": [{"id": "ok", "approval": {"message": "go?"}}]}
    gate = asyncio.Event()
    async for h in harness(tmp_path, {}, wf):
        h.engine.max_runs_per_caller = 2
        reporters = [Gate(gate) for _ in range(3)]
        running = [asyncio.create_task(h.run({}, reporter=r)) for r in reporters[:2]]
        first_two = reporters[:2]
        await asyncio.wait_for(_until(lambda rs=first_two: all(r.asked for r in rs)), 10)
        with pytest.raises(RunRefused) as info:
            await asyncio.wait_for(h.run({}, key="third", reporter=reporters[2]), 10)
        assert info.value.code == "too_many_runs_for_caller"
        assert h.store.find("order", principal(ALICE), "third") is None
        bob = Caller(sub="bob", issuer="https://idp", roles=("engineer",), scope=SCOPE,
                     expires=ALICE.expires)
        other = asyncio.create_task(h.run({}, caller=bob, reporter=Gate(gate)))
        gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*running, other), 10)
        assert all(a.structured["status"] == SUCCEEDED for a in answers)
        assert (await h.run({}, key="third", reporter=Gate(gate))).structured["status"] == SUCCEEDED


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_one_process_per_run_record(tmp_path: Path) -> None:
    """A second store on the same file is refused (two servers would undo runs twice)."""
    from mcp_servers.workflow.store import StoreLocked
    first = RunStore(tmp_path / "r.sqlite3")
    try:
        with pytest.raises(StoreLocked):
            RunStore(tmp_path / "r.sqlite3")
    finally:
        first.close()


def test_prune_forgets_finished_runs_only(tmp_path: Path) -> None:
    """Retention removes finished runs and their steps and keys; a run in progress stays."""
    store = RunStore(tmp_path / "r.sqlite3")
    try:
        done, _ = store.create("order", principal(ALICE), "old", caller_record(ALICE), {})
        store.set_step(done.id, "create", STEP_DONE, output={"id": 1})
        store.finish(done.id, SUCCEEDED, {"is_error": False, "structured": {}, "text": ""})
        going, _ = store.create("order", principal(ALICE), "live", caller_record(ALICE), {})
        assert store.prune(time.time() + 1) == 1
        assert store.get(done.id) is None and store.steps(done.id) == {}
        assert store.find("order", principal(ALICE), "old") is None
        assert store.get(going.id) is not None
    finally:
        store.close()
