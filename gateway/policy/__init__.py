"""Policy decisions: an engine interface with an embedded Rego backend (regopy) and a remote OPA
backend, the decision contract, and the policy input builder. The factory that picks a backend
is ``gateway.policy.factory`` (not imported here: it loads both backends).

    engine = build_engine(cfg.policy); await engine.start()
    decision = await engine.decide(build_policy_input(ctx, caller=..., server_name=..., ...))
"""

from gateway.policy.decision import (
    POLICY_CONTRACT_ERROR,
    POLICY_ERROR,
    ContractViolation,
    Decision,
    check_decision,
)
from gateway.policy.engine import PolicyEngine
from gateway.policy.errors import (
    PolicyCompileError,
    PolicyContractError,
    PolicyError,
    PolicyEvalError,
    PolicyInputError,
    PolicyInputRefused,
)
from gateway.policy.input import build_policy_input

__all__ = [
    "POLICY_CONTRACT_ERROR",
    "POLICY_ERROR",
    "ContractViolation",
    "Decision",
    "PolicyCompileError",
    "PolicyContractError",
    "PolicyEngine",
    "PolicyError",
    "PolicyEvalError",
    "PolicyInputError",
    "PolicyInputRefused",
    "build_policy_input",
    "check_decision",
]
