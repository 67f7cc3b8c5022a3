"""The caller: who a request acts for, built once from verified claims.

ext_authz builds a :class:`Caller` from the token it verified; the caller then crosses three
boundaries, each with an encoder and its decoder side by side here:

- the upstream request's identity headers (:meth:`Caller.to_headers` / :meth:`Caller.from_headers`),
  which an MCP server behind the gateway reads;
- ext_authz's dynamic metadata for ext_proc, as a Struct or as JSON text (:meth:`Caller.to_metadata`
  / :meth:`Caller.from_metadata`);
- the policy input's ``token`` (:meth:`Caller.token`), the verified claims as the policy reads them.

A session is bound to its :class:`SessionOwner` (issuer, subject, tenant), derived from the caller.

A token of a *delegation* issuer (``issuers[].delegation``: a service of the gateway acting for a
caller, RFC 8693's delegation shape) speaks for the caller named by its ``sub`` and
``caller_iss``; :func:`delegated_claims` turns its claims into the caller's, the actor kept in
``act``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.wire import (
    CLIENT_ID_HEADER,
    ISSUER_HEADER,
    ROLES_HEADER,
    TENANT_HEADER,
    USER_HEADER,
    decode_identity,
    encode_identity,
)

# Roles travel in one header, comma-separated, each encoded on its own; a comma or space inside a
# role is percent-encoded, so the list splits back into exactly the roles that were sent and a
# hand-written "a, b" (whitespace around items, as in any HTTP list) reads as the same two roles.
_ROLE_SEPARATOR = ","
_ROLE_RESERVED = ", "
# More roles than this is a broken token or hand-over, not a real caller.
MAX_ROLES = 64


# A delegation issuer's token: the issuer of the caller it acts for, and who acts (RFC 8693 4.1).
CLAIM_CALLER_ISSUER = "caller_iss"
CLAIM_ACTOR = "act"


def delegated_claims(claims: Mapping[str, Any], *, trusted_issuers: frozenset[str]
                     ) -> dict[str, Any]:
    """The verified claims of a delegation issuer's token as the caller's own: ``iss`` becomes the
    caller's issuer (``caller_iss``, which must be one of ``trusted_issuers``: a configured issuer
    that is not a delegation one), and ``act`` (an object with a ``sub``) gains ``iss``, the
    token's issuer, so the policy, the decision log and the upstream see both who the caller is
    and who acted. Raises ValueError naming the claim that is missing or wrong."""
    caller_iss = claims.get(CLAIM_CALLER_ISSUER)
    if not isinstance(caller_iss, str) or not caller_iss:
        raise ValueError(f"a delegated token needs the caller's issuer ({CLAIM_CALLER_ISSUER!r})")
    if caller_iss not in trusted_issuers:
        raise ValueError(f"{CLAIM_CALLER_ISSUER!r} is not an issuer the gateway trusts for callers")
    act = claims.get(CLAIM_ACTOR)
    if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
        raise ValueError(f"a delegated token needs the actor ({CLAIM_ACTOR!r} with a 'sub')")
    out = dict(claims)
    out[CLAIM_ACTOR] = {**act, "iss": claims.get("iss")}
    out["iss"] = caller_iss
    del out[CLAIM_CALLER_ISSUER]
    return out


def _text(value: Any) -> str | None:
    # A claim the gateway relies on is a non-empty string, else absent.
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class SessionOwner:
    """Who a session belongs to: the caller of the request that created it.

    At the gateway (``ext_authz.sessions``) the issuer and subject are always known; an MCP
    server run without the gateway in front sees no identity headers, so all three are None."""

    iss: str | None
    sub: str | None
    tenant: str | None = None

    def same_principal(self, other: SessionOwner) -> bool:
        return self.iss == other.iss and self.sub == other.sub

    def as_policy_input(self) -> dict[str, str | None]:
        """``input.session``; ``tenant`` absent for a tenant-less owner, because the policy's
        ``session_crosses_tenant`` reads a null tenant as present (a tenant-less owner would be
        refused its own session) while a missing one is compared by the binder."""
        out: dict[str, str | None] = {"iss": self.iss, "sub": self.sub}
        if self.tenant is not None:
            out["tenant"] = self.tenant
        return out

    def encode(self) -> bytes:
        return orjson.dumps([self.iss, self.sub, self.tenant])

    @classmethod
    def decode(cls, raw: bytes | str) -> SessionOwner:
        iss, sub, tenant = orjson.loads(raw)
        return cls(iss, sub, tenant)


# Typed reads of one encoded document (a metadata Struct or a JSON object): ``string(key,
# required)`` and ``strings(key)``, each raising for a field missing where required or of the
# wrong type.
ReadString = Callable[[str, bool], str | None]
ReadStrings = Callable[[str], tuple[str, ...]]
# The claims in metadata are JSON text in both encodings: a Struct would turn every number into a
# double, and the list policy must read the token exactly as ext_authz's policy read it.
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified caller. Every field is read from the claims once, with one rule each."""

    sub: str
    issuer: str | None = None
    tenant: str | None = None
    client_id: str | None = None
    roles: tuple[str, ...] = ()
    scope: str | None = None
    # When the caller's own token expires (its exp, Unix seconds): a service acting for the
    # caller (docs/workflows.md) grants nothing that outlives it. Not part of who the caller is.
    expires: int | None = field(default=None, compare=False)
    # The verified claims as the policy reads them (``input.token``); empty where the caller was
    # decoded from a boundary that carries only the typed fields.
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Caller:
        """The caller of a verified token (``ext_authz.jwt`` guarantees a non-empty ``sub``)."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ValueError("the claims have no 'sub' string")
        roles = claims.get("roles")
        scope = claims.get("scope")
        exp = claims.get("exp")
        return cls(
            sub=sub, issuer=_text(claims.get("iss")), tenant=_text(claims.get("tenant")),
            client_id=_text(claims.get("client_id")) or _text(claims.get("azp")),
            roles=tuple(r for r in roles if isinstance(r, str) and r)[:MAX_ROLES]
            if isinstance(roles, list) else (),
            scope=scope if isinstance(scope, str) else None,
            expires=exp if isinstance(exp, int) and not isinstance(exp, bool) else None,
            claims=dict(claims),
        )

    @property
    def owner(self) -> SessionOwner:
        return SessionOwner(self.issuer, self.sub, self.tenant)

    @property
    def act(self) -> dict[str, Any] | None:
        """Who acts for the caller: the ``act`` claim of a delegated token (its ``sub`` and
        ``iss``, plus what the actor says of itself; :func:`delegated_claims`), None for the
        caller's own token."""
        act = self.claims.get(CLAIM_ACTOR)
        return dict(act) if isinstance(act, Mapping) else None

    def token(self) -> dict[str, Any]:
        """The policy input's ``token``: the verified claims, or, for a caller decoded from a
        boundary without them, the typed fields under their claim names."""
        if self.claims:
            return dict(self.claims)
        out: dict[str, Any] = {"sub": self.sub, "roles": list(self.roles)}
        for name, value in (("iss", self.issuer), ("tenant", self.tenant),
                            ("client_id", self.client_id), ("scope", self.scope)):
            if value is not None:
                out[name] = value
        return out

    # ------------------------------------------------------------------ identity headers

    def to_headers(self) -> dict[str, str]:
        """The identity headers for the upstream (absent fields left out)."""
        out = {USER_HEADER: encode_identity(self.sub)}
        if self.issuer is not None:
            out[ISSUER_HEADER] = encode_identity(self.issuer)
        if self.tenant is not None:
            out[TENANT_HEADER] = encode_identity(self.tenant)
        if self.client_id is not None:
            out[CLIENT_ID_HEADER] = encode_identity(self.client_id)
        if self.roles:
            out[ROLES_HEADER] = _ROLE_SEPARATOR.join(
                encode_identity(r, reserved=_ROLE_RESERVED) for r in self.roles)
        return out

    @classmethod
    def from_headers(cls, get: Callable[[str], str | None]) -> Caller | None:
        """The caller the identity headers name, or None without ``x-mcp-user`` (no gateway in
        front). ``get`` looks a header up by its lower-case name. Raises ValueError for a
        spelling :meth:`to_headers` never produces, so one identity has exactly one form."""
        sub = decode_identity(get(USER_HEADER))
        if not sub:
            return None
        roles_value = get(ROLES_HEADER)
        roles: tuple[str, ...] = ()
        if roles_value:
            parts = roles_value.split(_ROLE_SEPARATOR)
            if len(parts) > MAX_ROLES:
                raise ValueError(f"more than {MAX_ROLES} roles")
            decoded = [decode_identity(p.strip(" \t"), reserved=_ROLE_RESERVED) for p in parts]
            if any(not r for r in decoded):
                raise ValueError("an empty role")
            roles = tuple(r for r in decoded if r)
        return cls(sub=sub, issuer=decode_identity(get(ISSUER_HEADER)) or None,
                   tenant=decode_identity(get(TENANT_HEADER)) or None,
                   client_id=decode_identity(get(CLIENT_ID_HEADER)) or None, roles=roles)

    # ------------------------------------------------------------------ ext_authz metadata

    def to_metadata(self, *, with_token: bool = False) -> dict[str, Any]:
        """The caller's fields of ext_authz's metadata for ext_proc. ``with_token`` adds the
        claims, which ext_proc needs only where it asks the list policy (the token it reads must
        be the one ext_authz's policy read)."""
        out: dict[str, Any] = {"sub": self.sub, "iss": self.issuer, "tenant": self.tenant,
                               "scope": self.scope, "roles": list(self.roles)}
        if with_token:
            out["token"] = orjson.dumps(self.token()).decode()
        return out

    @classmethod
    def from_metadata(cls, string: ReadString, strings: ReadStrings) -> Caller:
        """The inverse of :meth:`to_metadata`; raises ValueError naming a bad field (and lets the
        readers' own errors through)."""
        sub = string("sub", True)
        if not sub:
            raise ValueError("field 'sub' is empty")
        roles = strings("roles")
        if len(roles) > MAX_ROLES:
            raise ValueError("field 'roles' is too long")
        claims: dict[str, Any] = {}
        text = string("token", False)
        if text is not None:
            if len(text) > MAX_TOKEN_BYTES:
                raise ValueError("field 'token' is too long")
            try:
                claims = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ValueError("field 'token' is not JSON") from None
            if not isinstance(claims, dict) or claims.get("sub") != sub:
                raise ValueError("field 'token' is not the claims of this caller")
        return cls(sub=sub, issuer=string("iss", False) or None,
                   tenant=string("tenant", False) or None, scope=string("scope", False),
                   roles=roles,
                   client_id=_text(claims.get("client_id")) or _text(claims.get("azp")),
                   claims=claims)
