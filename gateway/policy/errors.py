"""Errors of the policy engine. ``code`` is stable: it labels metrics and decision logs."""

from __future__ import annotations


class PolicyError(Exception):
    """The policy could not produce a decision (engine, compile or transport failure)."""

    code = "policy_error"


class PolicyCompileError(PolicyError):
    """The policy folder does not compile; the message names file:line:col where known."""

    code = "policy_compile_error"


class PolicyEvalError(PolicyError):
    """Evaluation failed at run time (Rego runtime error, OPA unreachable, timeout, 5xx)."""


class PolicyInputError(PolicyError):
    """The policy input is not JSON-shaped data the engine can pass on."""


class PolicyInputRefused(PolicyInputError):
    """The request carries a value the engine cannot be handed (a NUL in a string the policy
    reads, nesting past the bound, an integer past 64 bits): the caller's input is at fault, so
    the request is refused with 400 instead of a retryable 503."""

    code = "policy_input_invalid"


class PolicyContractError(PolicyError):
    """The policy answered, but not with a value the decision contract allows."""

    code = "policy_contract_error"


class PolicyTimeoutError(PolicyEvalError):
    """An evaluation did not finish within the deadline (``policy.eval_timeout_ms``)."""


class PolicyBusyError(PolicyEvalError):
    """Every evaluation worker is busy and the wait queue is full: refused at once."""
