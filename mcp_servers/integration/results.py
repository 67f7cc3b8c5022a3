"""Backend answers and failures -> MCP tool outcomes with messages a model can act on.

Kept free of the MCP core so the wording can be tested on its own; ``server.py`` turns an
:class:`Outcome` into the core's ``ToolResult``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema

from mcp_servers.integration.client import BackendError, BackendResponse
from mcp_servers.integration.openapi import Operation

MAX_MESSAGE_CHARS = 500
_PARTIAL_DATA_KEYS = ("items", "data", "results", "records")


@dataclass(frozen=True)
class Outcome:
    texts: tuple[str, ...]
    structured: dict[str, Any] | None = None
    is_error: bool = False


def output_validator(op: Operation) -> jsonschema.protocols.Validator | None:
    if op.output_schema is None:
        return None
    cls = jsonschema.validators.validator_for(op.output_schema, default=jsonschema.Draft202012Validator)
    return cls(op.output_schema)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def backend_detail(body: Any) -> tuple[str, str | None]:
    """(message, offending field) from the common error body shapes (own, RFC 9457, FastAPI...)."""
    if isinstance(body, str):
        return _clip(body), None
    if not isinstance(body, dict):
        return "", None
    err = body.get("error")
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or err.get("description") or err.get("code") or ""
        field = err.get("field") or err.get("param") or err.get("parameter")
        return _clip(str(msg)), str(field) if field else None
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = detail[0].get("loc")
        field = None
        if isinstance(loc, list):
            field = ".".join(str(x) for x in loc if x not in ("body", "query", "path"))
        return _clip(str(detail[0].get("msg", ""))), field or None
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        field = first.get("field") or first.get("pointer") or first.get("path")
        msg = first.get("message") or first.get("detail") or ""
        return _clip(str(msg)), str(field) if field else None
    for key in ("message", "detail", "title", "error_description", "error"):
        if isinstance(body.get(key), str) and body[key]:
            return _clip(body[key]), None
    return "", None


def _argument_hint(op: Operation, field: str | None) -> str:
    if not field:
        return " Check the arguments against the tool's input schema and call again."
    root = field.split(".")[0].split("[")[0]
    known = set(op.input_schema.get("properties", {}))
    if root in known:
        return f" Fix argument '{field}' and call again."
    return f" The backend names '{field}' as the problem; check the related argument and call again."


def error_outcome(op: Operation, resp: BackendResponse) -> Outcome:
    status = resp.status
    msg, field = backend_detail(resp.body)
    said = f": {msg}" if msg else ""
    head = f"{op.tool_name} failed: the backend answered HTTP {status} {resp.reason}".rstrip()
    if status in (400, 422):
        text = f"{head}{said}.{_argument_hint(op, field)}"
    elif status == 401:
        text = (f"{head}: it refused the connector's credentials. This is a connector configuration problem "
                "(API key or OAuth client); changing the arguments will not help.")
    elif status == 403:
        text = f"{head}{said}. The connector's account is not allowed to do this."
    elif status == 404:
        text = f"{head}{said}. Check the identifiers passed as arguments (for example list first, then get)."
    elif status == 409:
        text = f"{head}{said}. The current state of the record does not allow this operation."
    elif status == 429:
        after = resp.headers.get("Retry-After")
        text = f"{head}: rate limited." + (f" Retry after {after} s." if after else " Retry later.")
    elif status >= 500:
        if op.idempotent:
            tried = f" after {resp.attempts} attempts" if resp.attempts > 1 else ""
            text = f"{head}{said}{tried}. The backend is failing; retry later."
        else:
            text = (f"{head}{said}. {op.method} is not idempotent, so it was not retried: check whether it "
                    "took effect (read the record back) before calling again.")
    elif 300 <= status < 400:
        text = f"{head}: a redirect to {resp.headers.get('Location', 'an unknown location')}, not followed."
    else:
        text = f"{head}{said}."
    return Outcome((text,), None, True)


def _partial_note(resp: BackendResponse) -> str | None:
    body = resp.body
    if not isinstance(body, dict):
        return "the backend marked this answer as partial (HTTP 206)" if resp.status == 206 else None
    problem = body.get("error") or body.get("errors") or body.get("warnings")
    has_data = any(k in body for k in _PARTIAL_DATA_KEYS)
    if resp.status == 206 or (problem and has_data):
        detail = ""
        if problem:
            detail = ": " + (problem if isinstance(problem, str) else json.dumps(problem)[:MAX_MESSAGE_CHARS])
        return f"the backend returned a partial result (HTTP {resp.status}){detail}"
    return None


def success_outcome(op: Operation, resp: BackendResponse,
                    validator: jsonschema.protocols.Validator | None) -> Outcome:
    if not resp.is_json:
        text = resp.body if isinstance(resp.body, str) and resp.body else f"Done (HTTP {resp.status})."
        if validator is not None:
            return Outcome((f"{op.tool_name}: the backend answered without JSON although its OpenAPI "
                            f"document promises a JSON object: {_clip(text)}",), None, True)
        return Outcome((text,))
    body_text = json.dumps(resp.body, ensure_ascii=False)
    if validator is not None:
        problem = jsonschema.exceptions.best_match(validator.iter_errors(resp.body))
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "(root)"
            return Outcome((f"{op.tool_name}: the backend's answer does not match its OpenAPI document at "
                            f"{where}: {_clip(problem.message)}. Raw answer follows.", body_text), None, True)
    structured = resp.body if isinstance(resp.body, dict) else None
    note = _partial_note(resp)
    if note:
        return Outcome((f"Partial result: {note}. The data below is incomplete.", body_text), structured)
    return Outcome((body_text,), structured)


def failure_outcome(op: Operation, error: BackendError) -> Outcome:
    return Outcome((f"{op.tool_name} failed: {error}",), None, True)


def outcome_for(op: Operation, resp: BackendResponse,
                validator: jsonschema.protocols.Validator | None) -> Outcome:
    if 200 <= resp.status < 300:
        return success_outcome(op, resp, validator)
    return error_outcome(op, resp)
