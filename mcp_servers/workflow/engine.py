"""Runs workflows: steps in order, each a tool call through the gateway as the caller, the run
record committed at every change, compensations in reverse order when a step fails, and the
recovery of runs a stopped server left unfinished.

A run belongs to the server, not to the client's connection: it is a task of its own, so a client
that goes away does not leave half a workflow behind (the run finishes or is compensated, and a
retry with the same idempotency key gets its answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.caller import Caller
from mcp_servers.workflow.client import (
    BAD_ARGUMENTS,
    BAD_OUTPUT,
    DECLINED,
    INTERRUPTED,
    GatewayClient,
    StepError,
)
from mcp_servers.workflow.delegation import Delegator, caller_from_record, caller_record, principal
from mcp_servers.workflow.spec import MissingValue, Step, Workflow, resolve
from mcp_servers.workflow.store import (
    FAILED,
    RUNNING,
    STEP_COMPENSATED,
    STEP_COMPENSATION_FAILED,
    STEP_DONE,
    STEP_FAILED,
    STEP_RUNNING,
    STEP_UNKNOWN,
    SUCCEEDED,
    RunRecord,
    RunStore,
    inputs_digest,
)

logger = logging.getLogger(__name__)

COMPENSATION_ATTEMPTS = 3
# Runs in progress at once in one server; more are refused (each holds a task and, while it waits
# for an approval, a client request).
MAX_RUNS = 100
# Runs in progress at once for one caller (issuer, subject, tenant): one caller cannot take every
# slot (a run waiting for an approval holds one for up to a minute). --max-runs-per-caller.
DEFAULT_MAX_RUNS_PER_CALLER = 10
RETRY_BACKOFF_SECONDS = 0.2
# After a restart the gateway may not be up yet: compensations of interrupted runs keep trying
# (retryable failures only) this long before the run is left for the next start.
RECOVERY_SECONDS = 300.0


class Reporter(Protocol):
    """The way back to the client of a run (none during recovery)."""

    async def progress(self, progress: float, total: float, message: str) -> None: ...

    async def approve(self, message: str) -> bool: ...


class NoClient:
    """Recovery has nobody to report to and nobody to approve."""

    async def progress(self, progress: float, total: float, message: str) -> None:
        return None

    async def approve(self, message: str) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Answer:
    """What the client gets (and a retry with the same key gets again)."""

    is_error: bool
    structured: dict[str, Any]
    text: str

    def as_record(self) -> dict[str, Any]:
        return {"is_error": self.is_error, "structured": self.structured, "text": self.text}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Answer:
        return cls(bool(data["is_error"]), dict(data["structured"]), str(data["text"]))


class RunRefused(Exception):
    """A run that is not started: the key was used before with other inputs, its run is still
    going, or too many runs are."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Engine:
    def __init__(self, workflows: Mapping[str, Workflow], store: RunStore, client: GatewayClient,
                 delegator: Delegator, *, retry_backoff: float = RETRY_BACKOFF_SECONDS,
                 recovery_seconds: float = RECOVERY_SECONDS,
                 max_runs_per_caller: int = DEFAULT_MAX_RUNS_PER_CALLER) -> None:
        self.workflows = workflows
        self.store = store
        self.client = client
        self.delegator = delegator
        self.retry_backoff = retry_backoff
        self.recovery_seconds = recovery_seconds
        self.max_runs_per_caller = max_runs_per_caller
        self._tasks: set[asyncio.Task[Answer]] = set()
        self._per_caller: dict[str, int] = {}  # runs in progress by principal

    # ---------------------------------------------------------------- starting a run

    async def start(self, wf: Workflow, caller: Caller, inputs: dict[str, Any], key: str | None,
                    reporter: Reporter) -> Answer:
        if len(self._tasks) >= MAX_RUNS:
            raise RunRefused("too_many_runs", f"{MAX_RUNS} workflow runs are in progress; "
                                      "retry later")
        who = principal(caller)
        if self._per_caller.get(who, 0) >= self.max_runs_per_caller:
            raise RunRefused("too_many_runs_for_caller",
                             f"{self.max_runs_per_caller} of your workflow runs are in progress "
                             "(the limit per caller); retry when one has finished")
        run, created = self.store.create(wf.name, who, key, caller_record(caller), inputs)
        if not created:
            return self._repeat(run, inputs)
        logger.info("workflow run started", extra={"workflow": wf.name, "run_id": run.id})
        task = asyncio.create_task(self._execute(run, wf, caller, reporter))
        self._tasks.add(task)
        self._per_caller[who] = self._per_caller.get(who, 0) + 1

        def done(t: asyncio.Task[Answer]) -> None:
            self._tasks.discard(t)
            left = self._per_caller.pop(who, 1) - 1
            if left > 0:
                self._per_caller[who] = left
        task.add_done_callback(done)
        # The request may be cancelled (the client left); the run is not.
        return await asyncio.shield(task)

    def _repeat(self, run: RunRecord, inputs: dict[str, Any]) -> Answer:
        if run.inputs_digest != inputs_digest(inputs):
            raise RunRefused("idempotency_key_reused",
                                      f"this idempotency key was used for run {run.id} with other inputs")
        if run.status == RUNNING or run.answer is None:
            raise RunRefused("run_in_progress",
                                      f"run {run.id} with this idempotency key is still running")
        logger.info("workflow run repeated by idempotency key",
                    extra={"workflow": run.workflow, "run_id": run.id})
        return Answer.from_record(run.answer)

    async def drain(self) -> None:
        """Wait for the runs in progress (at shutdown, after the requests drained)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- running

    async def _execute(self, run: RunRecord, wf: Workflow, caller: Caller,
                       reporter: Reporter) -> Answer:
        scope: dict[str, Any] = {"inputs": run.inputs, "steps": {}, "run": {"id": run.id}}
        total = len(wf.steps)
        for i, step in enumerate(wf.steps):
            await reporter.progress(i, total, f"step {step.id}: started")
            try:
                if step.call is None:
                    await self._approval(run, step, scope, reporter)
                else:
                    scope["steps"][step.id] = {"output": await self._run_step(run, wf, caller, step, scope)}
            except StepError as err:
                # A call that was sent and not answered may have taken effect: recorded as such
                # (not "failed"), and reported in the answer's outcome_unknown.
                self.store.set_step(run.id, step.id, STEP_UNKNOWN if err.outcome_unknown
                                    else STEP_FAILED, error=f"{err.reason}: {err.message}")
                return await self._fail(run, wf, caller, step, err, scope, reporter)
            await reporter.progress(i + 1, total, f"step {step.id}: done")
        return self._succeed(run, wf, scope)

    def _succeed(self, run: RunRecord, wf: Workflow, scope: Mapping[str, Any]) -> Answer:
        if wf.output is not None:
            try:
                output = resolve(wf.output, scope)
            except MissingValue as exc:
                output = {"error": str(exc)}
        else:
            output = {sid: v["output"] for sid, v in scope["steps"].items()}
        structured = {"run_id": run.id, "workflow": wf.name, "status": SUCCEEDED, "output": output}
        answer = Answer(False, structured, f"workflow {wf.name} succeeded (run {run.id})")
        self.store.finish(run.id, SUCCEEDED, answer.as_record())
        logger.info("workflow run succeeded", extra={"workflow": wf.name, "run_id": run.id})
        return answer

    async def _approval(self, run: RunRecord, step: Step, scope: Mapping[str, Any],
                        reporter: Reporter) -> None:
        assert step.approval is not None
        try:
            message = resolve(step.approval, scope)
        except MissingValue as exc:
            raise StepError(BAD_ARGUMENTS, str(exc)) from None
        self.store.set_step(run.id, step.id, STEP_RUNNING, attempt=True)
        if not await reporter.approve(str(message)):
            raise StepError(DECLINED, "the approval was declined")
        self.store.set_step(run.id, step.id, STEP_DONE)

    async def _run_step(self, run: RunRecord, wf: Workflow, caller: Caller, step: Step,
                        scope: Mapping[str, Any]) -> Any:
        call = step.call
        assert call is not None
        try:
            arguments = resolve(call.arguments, scope)
        except MissingValue as exc:
            raise StepError(BAD_ARGUMENTS, str(exc)) from None
        attempts = 1 + (step.retries if step.idempotent else 0)
        for attempt in range(attempts):
            # Committed before the call: after a crash, "running" means the outcome is unknown.
            self.store.set_step(run.id, step.id, STEP_RUNNING, attempt=True)
            token = self.delegator.token(caller, call.server, call.tool, workflow=wf.name, run_id=run.id)
            try:
                outcome = await self.client.call(call.server, call.tool, arguments, token,
                                                 timeout_seconds=call.timeout_seconds)
            except StepError as err:
                if not err.retryable or attempt + 1 >= attempts:
                    raise
                logger.info("workflow step retried", extra={
                    "workflow": wf.name, "run_id": run.id, "step": step.id, "reason": err.reason})
                await asyncio.sleep(self.retry_backoff * (attempt + 1))
                continue
            if step.output_schema is not None:
                problem = step.output_schema.problem(outcome.output, root="output")
                if problem is not None:
                    # The call ran, but its output is not what the workflow may use: not used
                    # by later steps nor to undo the step itself (its compensation would act on
                    # values the server chose), so the step is left for someone to check.
                    raise StepError(BAD_OUTPUT, f"the output does not match output_schema: {problem}",
                                    outcome_unknown=True)
            self.store.set_step(run.id, step.id, STEP_DONE, output=outcome.output)
            return outcome.output
        raise AssertionError("unreachable")  # the loop returns or raises

    # ---------------------------------------------------------------- failing and undoing

    async def _fail(self, run: RunRecord, wf: Workflow, caller: Caller, failed: Step,
                    err: StepError, scope: dict[str, Any], reporter: Reporter,
                    *, deadline: float | None = None, outcome_unknown: bool | None = None) -> Answer:
        undone, not_undone = await self._compensate(run, wf, caller, scope, reporter, deadline)
        if outcome_unknown is None:
            outcome_unknown = err.outcome_unknown
        unknown = [failed.id] if outcome_unknown else []
        structured: dict[str, Any] = {
            "run_id": run.id, "workflow": wf.name, "status": FAILED, "failed_step": failed.id,
            "reason": err.reason, "error": err.message, "undone": undone, "not_undone": not_undone}
        if err.detail:
            structured["detail"] = err.detail
        if unknown:
            # A step whose call was sent but not answered (timeout, cut-off or bad answer, 502/504,
            # reset) or that was interrupted may have taken effect: it has no output to undo it
            # with, so the caller must check it.
            structured["outcome_unknown"] = unknown
        text = (f"workflow {wf.name} failed at step {failed.label}: {err.reason}: {err.message}; "
                f"undone: {', '.join(undone) or 'nothing'}")
        if not_undone:
            text += "; NOT undone: " + ", ".join(f"{n['step']} ({n['error']})" for n in not_undone)
        if unknown:
            text += f"; outcome unknown: {', '.join(unknown)}"
        answer = Answer(True, structured, text)
        self.store.finish(run.id, FAILED, answer.as_record())
        logger.warning("workflow run failed", extra={
            "workflow": wf.name, "run_id": run.id, "step": failed.id, "reason": err.reason,
            "undone": undone, "not_undone": [n["step"] for n in not_undone]})
        return answer

    async def _compensate(self, run: RunRecord, wf: Workflow, caller: Caller,
                          scope: dict[str, Any], reporter: Reporter, deadline: float | None
                          ) -> tuple[list[str], list[dict[str, str]]]:
        """Undo the done steps that declared a compensation, last first."""
        undone: list[str] = []
        not_undone: list[dict[str, str]] = []
        done = [s for s in wf.steps if s.id in scope["steps"] and s.compensate is not None]
        for n, step in enumerate(reversed(done)):
            comp = step.compensate
            assert comp is not None
            await reporter.progress(n, len(done), f"undo {step.id}: started")
            try:
                arguments = resolve(comp.arguments, scope)
                await self._compensation_call(run, wf, caller, step, arguments, deadline)
            except MissingValue as exc:
                error = f"{BAD_ARGUMENTS}: {exc}"
            except StepError as exc:
                error = f"{exc.reason}: {exc.message}"
            else:
                self.store.set_step(run.id, step.id, STEP_COMPENSATED)
                undone.append(step.id)
                await reporter.progress(n + 1, len(done), f"undo {step.id}: done")
                continue
            self.store.set_step(run.id, step.id, STEP_COMPENSATION_FAILED, error=error)
            not_undone.append({"step": step.id, "error": error})
        return undone, not_undone

    async def _compensation_call(self, run: RunRecord, wf: Workflow, caller: Caller, step: Step,
                                 arguments: dict[str, Any], deadline: float | None) -> None:
        comp = step.compensate
        assert comp is not None
        attempt = 0
        while True:
            attempt += 1
            # Not capped at the caller's token expiry: undoing is in the caller's interest
            # (docs/workflows.md); the scope check still applies.
            token = self.delegator.token(caller, comp.server, comp.tool, workflow=wf.name,
                                         run_id=run.id, compensation=True)
            try:
                await self.client.call(comp.server, comp.tool, arguments, token,
                                       timeout_seconds=comp.timeout_seconds)
                return
            except StepError as err:
                more = (time.monotonic() < deadline) if deadline is not None \
                    else attempt < COMPENSATION_ATTEMPTS
                if not err.retryable or not more:
                    raise
            await asyncio.sleep(min(self.retry_backoff * attempt, 5.0))

    # ---------------------------------------------------------------- recovery

    async def recover(self) -> int:
        """Compensate every run a stopped server left unfinished; how many were settled."""
        settled = 0
        for run in self.store.unfinished():
            wf = self.workflows.get(run.workflow)
            if wf is None:
                logger.error("unfinished workflow run of a workflow no longer loaded: left as is",
                             extra={"workflow": run.workflow, "run_id": run.id})
                continue
            await self._recover_run(run, wf)
            settled += 1
        return settled

    async def _recover_run(self, run: RunRecord, wf: Workflow) -> None:
        caller = caller_from_record(run.caller)
        records = self.store.steps(run.id)
        scope: dict[str, Any] = {"inputs": run.inputs, "steps": {}, "run": {"id": run.id}}
        failed: Step | None = None
        for step in wf.steps:
            rec = records.get(step.id)
            if rec is not None and rec.status == STEP_DONE:
                if step.call is not None:
                    scope["steps"][step.id] = {"output": rec.output}
                continue
            if rec is not None and rec.status == STEP_RUNNING:
                self.store.set_step(run.id, step.id, STEP_UNKNOWN, error=INTERRUPTED)
            failed = step
            break
        if failed is None:
            # Every step had finished: the run only lacked its answer. Complete it.
            self._succeed(run, wf, scope)
            return
        logger.warning("compensating an interrupted workflow run",
                       extra={"workflow": wf.name, "run_id": run.id, "step": failed.id})
        rec = records.get(failed.id)
        # A call step left running may have taken effect (its outcome is unknown); a step that
        # never started, or an approval, did nothing.
        unknown = rec is not None and rec.status == STEP_RUNNING and failed.call is not None
        err = StepError(INTERRUPTED, "the workflow server stopped during this step" if unknown
                        else "the workflow server stopped before this step finished")
        await self._fail(run, wf, caller, failed, err, scope, NoClient(),
                         deadline=time.monotonic() + self.recovery_seconds, outcome_unknown=unknown)
