"""The decision contract (policies/README.md) and its checker.

A decision is ``true``/``false`` or an object ``{allow, reason, http_status, headers,
obligations, missing_scope}``. Anything else is a policy bug and fails closed with error_code
``policy_contract_error``; an engine failure fails closed with ``policy_error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.pii import UnknownPiiType, normalize_types
from gateway.wire import CONTEXT_HEADER, GATEWAY_HEADERS, STATUS_HEADER

POLICY_ERROR = "policy_error"
POLICY_CONTRACT_ERROR = "policy_contract_error"
# Engine failures are transient by nature (OPA down, timeout): 503 invites a retry. A contract
# violation is a bug in the policy that a retry cannot fix: 500.
POLICY_ERROR_STATUS = 503
# A value in the request the engine cannot take (a NUL in a string, say): the client's to fix.
POLICY_INPUT_INVALID = "policy_input_invalid"
POLICY_INPUT_INVALID_STATUS = 400
POLICY_CONTRACT_ERROR_STATUS = 500
DEFAULT_DENY_STATUS = 403

REASON_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# RFC 7230 token characters for header names; values must not be able to start a new header.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e\x80-\xff]{0,4096}$")
# Names a policy may not set: the gateway's own (identity headers come from verified claims
# only; x-mcp-inspect, x-mcp-status and the caller context are ext_authz's signals to Envoy),
# Envoy's, and those that frame the HTTP message.
RESERVED_HEADERS = frozenset({
    *GATEWAY_HEADERS, STATUS_HEADER, CONTEXT_HEADER, "authorization",
    "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "te", "trailer", "host", "proxy-connection"})
_RESERVED_PREFIXES = ("x-envoy-", ":")

# RFC 6749 scope-token characters: it is quoted into WWW-Authenticate, so no '"' or '\'.
_SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}( [\x21\x23-\x5b\x5d-\x7e]{1,256}){0,15}$")


@dataclass(frozen=True)
class Decision:
    """What the gateway does with one request. ``reason`` is a stable snake_case metric label."""

    allow: bool
    reason: str
    http_status: int
    headers: dict[str, str] = field(default_factory=dict)
    obligations: dict[str, Any] = field(default_factory=dict)
    missing_scope: str | None = None
    error_code: str | None = None


def engine_error() -> Decision:
    """The engine could not decide: deny (fail closed). The detail goes to the log only."""
    return Decision(False, POLICY_ERROR, POLICY_ERROR_STATUS, {}, {}, None, POLICY_ERROR)


def input_error() -> Decision:
    """The request holds a value the engine cannot take (``PolicyInputRefused``): deny with 400,
    since retrying the same request cannot help."""
    return Decision(False, POLICY_INPUT_INVALID, POLICY_INPUT_INVALID_STATUS, {}, {}, None,
                    POLICY_INPUT_INVALID)


def contract_error() -> Decision:
    """The policy answered outside the contract: deny (fail closed)."""
    return Decision(False, POLICY_CONTRACT_ERROR, POLICY_CONTRACT_ERROR_STATUS, {}, {}, None,
                    POLICY_CONTRACT_ERROR)


class ContractViolation(ValueError):
    """The message names what the contract expected and what the policy returned."""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check_decision(value: Any, *, defined: bool = True) -> Decision:
    """Validate a policy result against the contract; raise ContractViolation when it is not."""
    if not defined:
        raise ContractViolation("expected a decision (boolean or object), got undefined")
    if value is True:
        return Decision(True, "allowed", 200)
    if value is False:
        return Decision(False, "denied", DEFAULT_DENY_STATUS)
    if not isinstance(value, dict):
        raise ContractViolation(f"expected a decision (boolean or object), got {_type_name(value)}")
    if "allow" not in value:
        raise ContractViolation("expected decision.allow (boolean), but it is missing")
    allow = value["allow"]
    if not isinstance(allow, bool):
        raise ContractViolation(f"expected decision.allow to be a boolean, got {_type_name(allow)}")

    reason = value.get("reason", "allowed" if allow else "denied")
    if not isinstance(reason, str) or not REASON_RE.match(reason):
        raise ContractViolation("expected decision.reason to be a snake_case string "
                                f"(^[a-z][a-z0-9_]{{0,63}}$), got {_type_name(reason)} {reason!r:.80}")

    status = value.get("http_status")
    if status is None:
        status = 200 if allow else DEFAULT_DENY_STATUS
    elif isinstance(status, bool) or not isinstance(status, int):
        raise ContractViolation(f"expected decision.http_status to be an integer, got {_type_name(status)}")
    elif not allow and not 400 <= status <= 599:
        raise ContractViolation(f"expected decision.http_status of a denial to be 400-599, got {status}")
    if allow:
        status = 200  # only meaningful when denied

    headers = value.get("headers", {})
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise ContractViolation(f"expected decision.headers to be an object, got {_type_name(headers)}")
    for name, hval in headers.items():
        if not _HEADER_NAME_RE.match(name):
            raise ContractViolation(f"expected decision.headers names to be HTTP tokens, got {name!r:.80}")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES):
            raise ContractViolation(f"decision.headers may not set {lowered!r}: the gateway owns it")
        if not isinstance(hval, str) or not _HEADER_VALUE_RE.match(hval):
            raise ContractViolation(f"expected decision.headers[{name!r}] to be a single-line string, "
                                    f"got {_type_name(hval)}")

    obligations = value.get("obligations", {})
    if obligations is None:
        obligations = {}
    if not isinstance(obligations, dict):
        raise ContractViolation("expected decision.obligations to be an object, "
                                f"got {_type_name(obligations)}")
    mask = obligations.get("mask_pii")
    if isinstance(mask, list) and all(isinstance(k, str) for k in mask):
        # A kind the masker does not know would fail the answer at response time (ext_proc);
        # refused here, before the request reaches the server. Other shapes mask everything.
        try:
            normalize_types(mask)
        except UnknownPiiType as exc:
            raise ContractViolation(f"decision.obligations.mask_pii: {exc}") from None

    missing = value.get("missing_scope")
    if missing == "" or missing is None:
        missing = None
    elif not isinstance(missing, str) or not _SCOPE_RE.match(missing):
        raise ContractViolation("expected decision.missing_scope to be a space-separated list of "
                                f"scope tokens, got {_type_name(missing)} {missing!r:.80}")

    return Decision(allow, reason, status, {k.lower(): v for k, v in headers.items()},
                    obligations, missing)
