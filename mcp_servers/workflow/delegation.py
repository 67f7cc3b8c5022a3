"""Delegated access tokens: how a step acts as the caller at the gateway.

The workflow server never sees the client's token (the gateway strips it). It receives the
gateway's signed caller assertion, which is good for this server only. For each step it signs a
short-lived access token with its own key (RFC 8693's delegation shape: ``sub`` is the caller,
``act`` names the workflow server) that the gateway accepts as a configured issuer. The token
copies the caller's subject, tenant, client id and roles from the verified assertion and nothing
else; its audience is the one server of the step and its scope the one tool of the step, so the
gateway's policy, catalog, rate limits, masking and audit judge each step as the caller's own call
to that tool. docs/workflows.md says why and what this key can do.

It grants nothing the caller does not hold: the step's ``tools:call:<server>/<tool>`` must be in
the caller's own scope (the assertion's ``scope``: that scope or ``tools:call:<server>/*``), else
the step is refused naming the missing scope; and a step's token expires no later than the
caller's token (the assertion's ``caller_exp``). A compensation's token is not capped at the
caller's expiry (undoing is the caller's interest; docs/workflows.md says why) and says so in
``act.compensation``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jwt

from gateway.assertion import KeyRing, new_private_jwk
from gateway.caller import Caller
from mcp_servers.workflow.client import REFUSED, StepError

TOKEN_TTL_SECONDS = 60
ACTOR = "mcp-gateway-workflow"
TOOL_SCOPE_PREFIX = "tools:call:"


def step_scope(server: str, tool: str) -> str:
    """The scope a call of ``tool`` on ``server`` needs (policies/authz.rego's required_scope)."""
    return f"{TOOL_SCOPE_PREFIX}{server}/{tool}"


def delegated_scope(caller: Caller, server: str, tool: str) -> str:
    """The delegated token's scope: the step's one tool, which the caller must hold itself (the
    scope or the server's ``/*``, as the policy grants it), plus the caller's scopes that grant no
    tool call (an organisation rule may require them, policies/org.rego): never more than the
    caller holds. Raises StepError ``refused`` naming what is missing."""
    needed = step_scope(server, tool)
    if caller.scope is None:
        raise StepError(REFUSED, f"the caller's scopes are unknown (the gateway's caller assertion "
                        f"carries none), so {needed} cannot be granted",
                        detail={"reason": "insufficient_scope", "missing_scope": needed})
    held = caller.scope.split()
    if needed not in held and f"{TOOL_SCOPE_PREFIX}{server}/*" not in held:
        raise StepError(REFUSED, f"the caller's token does not grant {needed}",
                        detail={"reason": "insufficient_scope", "missing_scope": needed})
    others = [s for s in dict.fromkeys(held) if not s.startswith(TOOL_SCOPE_PREFIX)]
    return " ".join([needed, *others])


def load_or_create_key(path: Path) -> KeyRing:
    """The signing key file (a private JWK set, mode 0600), made on first start."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"keys": [new_private_jwk()]}, fh)
    return KeyRing.load(path)


def publish_jwks(ring: KeyRing, path: Path) -> None:
    """Write the public half where the gateway's issuer entry fetches it (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ring.public_jwks(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


class Delegator:
    """Signs the per-step tokens with the first key of ``ring``."""

    def __init__(self, ring: KeyRing, issuer: str, gateway_url: str) -> None:
        self._ring = ring
        self.issuer = issuer
        self.gateway_url = gateway_url.rstrip("/")

    def audience(self, server: str) -> str:
        return f"{self.gateway_url}/mcp/{server}"

    def token(self, caller: Caller, server: str, tool: str, *, workflow: str, run_id: str,
              now: float | None = None, compensation: bool = False) -> str:
        """A token for one call of ``tool`` on ``server`` as ``caller``; raises StepError
        ``refused`` when the caller does not hold the tool's scope, or (not for a compensation)
        when the caller's token expiry is unknown or past."""
        issued = int(time.time() if now is None else now)
        scope = delegated_scope(caller, server, tool)
        exp = issued + TOKEN_TTL_SECONDS
        act: dict[str, Any] = {"sub": ACTOR, "workflow": workflow, "run": run_id}
        if compensation:
            act["compensation"] = True
        else:
            if caller.expires is None:
                raise StepError(REFUSED, "the caller's token expiry is unknown (the gateway's caller "
                                "assertion carries no caller_exp)",
                                detail={"reason": "caller_token_expired"})
            if caller.expires <= issued:
                raise StepError(REFUSED, "the caller's token has expired; call the workflow again "
                                "with a fresh token", detail={"reason": "caller_token_expired"})
            exp = min(exp, caller.expires)
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": caller.sub, "aud": self.audience(server),
            "iat": issued, "exp": exp, "jti": os.urandom(16).hex(),
            "roles": list(caller.roles), "scope": scope, "act": act,
        }
        if caller.issuer is not None:
            claims["caller_iss"] = caller.issuer
        if caller.tenant is not None:
            claims["tenant"] = caller.tenant
        if caller.client_id is not None:
            claims["client_id"] = caller.client_id
        entry = self._ring.signing
        return jwt.encode(claims, entry.private_key, algorithm="ES256",
                          headers={"kid": entry.kid, "typ": "at+jwt"})


def caller_record(caller: Caller) -> dict[str, Any]:
    """What the run record keeps of the caller (to act for it again after a restart)."""
    return {"sub": caller.sub, "issuer": caller.issuer, "tenant": caller.tenant,
            "client_id": caller.client_id, "roles": list(caller.roles), "scope": caller.scope,
            "expires": caller.expires}


def caller_from_record(data: dict[str, Any]) -> Caller:
    # A record written before scope and expires were kept has neither: its steps are refused.
    return Caller(sub=data["sub"], issuer=data.get("issuer"), tenant=data.get("tenant"),
                  client_id=data.get("client_id"), roles=tuple(data.get("roles", ())),
                  scope=data.get("scope"), expires=data.get("expires"))


def principal(caller: Caller) -> str:
    """Whose idempotency keys these are: a subject is unique only within its issuer and tenant."""
    return json.dumps([caller.issuer, caller.sub, caller.tenant])
