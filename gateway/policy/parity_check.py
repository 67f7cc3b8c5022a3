"""Constructs whose meaning differs between rego-cpp (serving) and OPA: see findings."""

from __future__ import annotations

from gateway.policy.reference import Finding
from gateway.policy.rego import PolicySources


def findings(sources: PolicySources) -> list[Finding]:
    """Constructs in the non-test modules that can decide differently on the two engines."""
    return []
