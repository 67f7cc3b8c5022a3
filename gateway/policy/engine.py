"""The engine interface every backend implements (the factory that picks one is
``gateway.policy.factory``)."""

from __future__ import annotations

import abc
import logging
from typing import Any

from gateway.policy.decision import (
    ContractViolation,
    Decision,
    check_decision,
    contract_error,
    engine_error,
    input_error,
)
from gateway.policy.errors import PolicyError, PolicyInputRefused
from gateway.policy.rego import ENTRYPOINT_RE

logger = logging.getLogger(__name__)

DEFAULT_RELOAD_INTERVAL_SECONDS = 2.0
DEFAULT_OPA_TIMEOUT_SECONDS = 0.25


class PolicyEngine(abc.ABC):
    """Decides requests by evaluating the configured entrypoint with a policy input.

    ``decide`` never raises for a policy problem: it returns a deny (fail closed) whose
    ``error_code`` says why. ``query`` returns the raw value of any rule (None when undefined)
    and raises PolicyError on engine failures; callers must treat that as a deny.
    """

    def __init__(self, entrypoint: str) -> None:
        if not ENTRYPOINT_RE.match(entrypoint):
            raise PolicyError(f"invalid policy entrypoint {entrypoint!r}: "
                              "expected a path like mcp/authz/decision")
        self.entrypoint = entrypoint

    @property
    def revision(self) -> str | None:
        """What identifies the policy now deciding (decision logs); None where unknown."""
        return None

    @abc.abstractmethod
    async def start(self) -> None:
        """Load / connect. Raises PolicyError when the policy cannot serve at all."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; idempotent."""

    @abc.abstractmethod
    async def evaluate(self, entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        """(defined, value) of one rule; raises PolicyError."""

    async def decide(self, policy_input: Any) -> Decision:
        try:
            defined, value = await self.evaluate(self.entrypoint, policy_input)
        except PolicyInputRefused as exc:
            logger.info("policy input refused on %s: %s", self.entrypoint, exc)
            return input_error()
        except PolicyError as exc:
            logger.error("policy engine error on %s: %s", self.entrypoint, exc)
            return engine_error()
        try:
            return check_decision(value, defined=defined)
        except ContractViolation as exc:
            logger.error("policy contract error on %s: %s", self.entrypoint, exc)
            return contract_error()

    async def query(self, entrypoint: str, policy_input: Any) -> Any:
        if not ENTRYPOINT_RE.match(entrypoint):
            raise PolicyError(f"invalid entrypoint {entrypoint!r}: "
                              "expected a path like mcp/authz/visible_tools")
        defined, value = await self.evaluate(entrypoint, policy_input)
        return value if defined else None

