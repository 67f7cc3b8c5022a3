"""Who is signed in: the bearer token checked exactly as ext_authz checks it (issuer, signature,
audience ``<public_url>/console``, expiry), the console's Rego decision asked for every page and
action, and server-side sessions whose cookie holds only a random id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.caller import Caller
from gateway.policy.decision import ContractViolation, Decision, check_decision
from gateway.policy.errors import PolicyError
from gateway.policy.rego import CompiledPolicy, PolicySources, fingerprint, load_sources
from gateway.policy.static import is_warning, run_check

logger = logging.getLogger(__name__)

POLICY_CHECK_INTERVAL_SECONDS = 1.0
ACTIONS = ("view", "approve", "quarantine", "export")


class PolicyUnavailable(Exception):
    """No policy bundle could be loaded: every console decision is a refusal."""


class ConsolePolicy:
    """The policy folder compiled once for the console's decision and ext_authz's decision
    entrypoint, recompiled when a file of the folder changes (checked at most once a second).
    A folder that fails to compile or fails the static check keeps the previous bundle (and is
    logged); with none loaded yet, every decision is a refusal."""

    def __init__(self, policy_dir: str, authz_entrypoint: str, console_entrypoint: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy_dir = policy_dir
        self.authz_entrypoint = authz_entrypoint
        self.console_entrypoint = console_entrypoint
        self._clock = clock
        self._compiled: CompiledPolicy | None = None
        self._fingerprint: Any = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()
        self.error: str | None = None
        self.version = 0  # grows with every bundle loaded

    def _build(self) -> tuple[Any, CompiledPolicy]:
        """(fingerprint, bundle) of the folder now; raises PolicyError. Runs on a thread."""
        fp = fingerprint(self.policy_dir)
        refused = [f for f in run_check(self.policy_dir, self.authz_entrypoint) if not is_warning(f)]
        if refused:
            raise PolicyError(f"the policy fails `mcp-gateway policy check`: {refused[0].message}")
        sources = load_sources(self.policy_dir, include_tests=False)
        return fp, CompiledPolicy(sources, [self.authz_entrypoint, self.console_entrypoint])

    async def refresh(self, *, force: bool = False) -> CompiledPolicy:
        """The current bundle, recompiled first when the folder changed."""
        now = self._clock()
        fresh = now - self._checked_at < POLICY_CHECK_INTERVAL_SECONDS
        if not force and self._compiled is not None and fresh:
            return self._compiled
        async with self._lock:
            if not force and self._compiled is not None and \
                    self._clock() - self._checked_at < POLICY_CHECK_INTERVAL_SECONDS:
                return self._compiled
            self._checked_at = self._clock()
            try:
                current = await asyncio.to_thread(fingerprint, self.policy_dir)
                if force or current != self._fingerprint or self._compiled is None:
                    fp, compiled = await asyncio.to_thread(self._build)
                    self._compiled, self._fingerprint = compiled, fp
                    self.version += 1
                    self.error = None
                    logger.info("console policy loaded", extra={"version": self.version})
            except (OSError, PolicyError) as exc:
                self.error = str(exc)
                logger.warning("console policy not reloaded: %s", exc)
            if self._compiled is None:
                raise PolicyUnavailable(self.error or "no policy loaded")
            return self._compiled

    @property
    def sources(self) -> PolicySources | None:
        return self._compiled.sources if self._compiled is not None else None

    async def console_decision(self, claims: Mapping[str, Any], action: str) -> Decision:
        """The console's Rego decision for ``action`` by the holder of ``claims``; a policy
        error or an answer outside the decision contract is a refusal."""
        try:
            compiled = await self.refresh()
            caller = Caller.from_claims(claims)
            defined, value = compiled.evaluate(
                self.console_entrypoint, {"token": caller.token(), "console": {"action": action}})
            return check_decision(value, defined=defined)
        except (PolicyUnavailable, PolicyError, ContractViolation, ValueError) as exc:
            logger.warning("console decision failed closed: %s", exc)
            return Decision(allow=False, reason="console_policy_error", http_status=503)

    async def evaluate(self, policy_input: dict[str, Any]) -> tuple[bool, Any]:
        """ext_authz's decision entrypoint on ``policy_input`` (raises PolicyError)."""
        compiled = await self.refresh()
        return compiled.evaluate(self.authz_entrypoint, policy_input)


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


@dataclass(slots=True)
class Session:
    sub: str
    claims: dict[str, Any]
    csrf: str
    expires: float  # wall clock: min(token exp, sign-in + console.session_seconds)
    roles: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class SessionStore:
    """Sessions in this process's memory, keyed by the SHA-256 of a 256-bit random id (the id
    itself is never stored or logged). Bounded: expired sessions go first, then the oldest."""

    def __init__(self, *, max_sessions: int, clock: Callable[[], float] = time.time) -> None:
        self._sessions: dict[bytes, Session] = {}
        self._max = max_sessions
        self._clock = clock

    def create(self, claims: Mapping[str, Any], *, lifetime: float) -> tuple[str, Session]:
        now = self._clock()
        exp = claims.get("exp")
        expires = now + lifetime
        if isinstance(exp, int | float):
            expires = min(expires, float(exp))
        if len(self._sessions) >= self._max:
            self._evict(now)
        session_id = secrets.token_urlsafe(32)
        caller = Caller.from_claims(claims)
        session = Session(sub=caller.sub, claims=dict(claims), csrf=secrets.token_urlsafe(32),
                          expires=expires, roles=caller.roles, created=now)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if self._clock() >= session.expires:
            del self._sessions[key]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def _evict(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        while len(self._sessions) >= self._max:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]

    def __len__(self) -> int:
        return len(self._sessions)
