"""Session binding in ext_authz: ids checked before use, owners recorded at first use, foreign
callers answered as for a missing session, tenant switches refused, bounded memory, shared Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import MemoryRateLimiter
from ext_authz.servicer import AuthorizationServicer
from ext_authz.sessions import (
    ENDED,
    MAX_SESSION_ID_CHARS,
    REDIS_KEY_PREFIX,
    InvalidSessionId,
    MemorySessionStore,
    RedisSessionStore,
    SessionBinder,
    SessionNotFound,
    SessionStoreUnavailable,
    SessionTenantMismatch,
    session_id_of,
    session_key,
)
from gateway.caller import Caller, SessionOwner
from gateway.errors import SESSION_NOT_FOUND
from gateway.jwks import JwksClient
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    JwksServer,
    StubEngine,
    check_request,
    denial,
    make_settings,
    token_for,
    upstream,
)
from tests.ports import free_port

ISSUER_B = "https://idp-b.example.test"
ALICE = SessionOwner(ISSUER, "alice", "acme")
SID = "3f1c2d9e8b7a4c56"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ session ids

@pytest.mark.parametrize("value", [SID, "a" * MAX_SESSION_ID_CHARS, "!~#$%&'()*+-./:;<=>?@[]^_`{|}",
                                   "eyJzIjoiYSJ9"])
def test_visible_ascii_ids_are_accepted(value: str) -> None:
    """UUIDs, hex, base64 and any visible ASCII but "," up to the length bound are ids."""
    assert session_id_of({"mcp-session-id": value}) == value


@pytest.mark.parametrize("value", ["", "a" * (MAX_SESSION_ID_CHARS + 1), "a b", "a\tb", "a\x00b",
                                   "a\x7fb", "caf\u00e9", "a,b", "\u0661\u0662", "a\r\nx-mcp-user: b"],
                         ids=["empty", "too-long", "space", "tab", "nul", "del", "non-ascii",
                              "joined-repeat", "arabic-digits", "crlf"])
def test_other_ids_are_refused_before_any_lookup(value: str) -> None:
    """Empty, oversized, control, non-ASCII and comma-joined (repeated header) ids: 400."""
    with pytest.raises(InvalidSessionId) as info:
        session_id_of({"mcp-session-id": value})
    assert info.value.http_status == 400 and info.value.code == "invalid_session_id"


def test_no_header_is_no_session() -> None:
    """A request without Mcp-Session-Id names no session."""
    assert session_id_of({}) is None


def test_keys_are_hashes_per_server() -> None:
    """The store never holds the id itself, and one id on two servers is two sessions."""
    key = session_key("files", SID)
    assert SID not in key and key != session_key("database", SID)
    assert key == session_key("files", SID) and len(key) == 40


# ------------------------------------------------------------------------------- the binder

@pytest.mark.parametrize("other", [SessionOwner(ISSUER, "mallory", "acme"),
                                   SessionOwner(ISSUER_B, "alice", "acme"),
                                   SessionOwner(ISSUER + "/", "alice", "acme"),
                                   SessionOwner(ISSUER, "Alice", "acme")],
                         ids=["other-sub", "other-issuer", "issuer-spelling", "sub-case"])
async def test_another_principal_gets_session_not_found(other: SessionOwner) -> None:
    """The first caller owns the id; another issuer or subject gets 404, the owner keeps it."""
    binder = SessionBinder(MemorySessionStore())
    assert await binder.owner("files", SID, ALICE) == ALICE
    with pytest.raises(SessionNotFound) as info:
        await binder.owner("files", SID, other)
    assert info.value.http_status == 404 and info.value.rpc_code == SESSION_NOT_FOUND
    assert await binder.owner("files", SID, ALICE) == ALICE


async def test_same_principal_other_tenant_gets_the_owner_and_is_refused() -> None:
    """Same issuer and subject in another (or no) tenant: the owner is returned for the policy,
    and the gateway's own check refuses the switch."""
    binder = SessionBinder(MemorySessionStore())
    await binder.owner("files", SID, ALICE)
    for tenant in ("globex", None, "ACME"):
        caller = SessionOwner(ISSUER, "alice", tenant)
        owner = await binder.owner("files", SID, caller)
        assert owner == ALICE and owner.as_policy_input() == {"iss": ISSUER, "sub": "alice",
                                                              "tenant": "acme"}
        with pytest.raises(SessionTenantMismatch):
            binder.check_tenant(owner, caller)
    binder.check_tenant(ALICE, ALICE)


async def test_tenantless_owner_has_no_tenant_key() -> None:
    """A tenant-less owner is {"iss", "sub"} for the policy; a caller with a tenant is refused."""
    owner = Caller.from_claims({"iss": ISSUER, "sub": "svc", "tenant": ""}).owner
    assert owner.tenant is None and owner.as_policy_input() == {"iss": ISSUER, "sub": "svc"}
    with pytest.raises(SessionTenantMismatch):
        SessionBinder.check_tenant(owner, SessionOwner(ISSUER, "svc", "acme"))
    assert Caller.from_claims({"iss": ISSUER, "sub": "x", "tenant": 7}).owner.tenant is None


async def test_ended_session_is_not_found_for_everyone() -> None:
    """After DELETE the id answers 404 to its owner too, and nobody can claim it again."""
    binder = SessionBinder(MemorySessionStore())
    await binder.owner("files", SID, ALICE)
    await binder.end("files", SID)
    for caller in (ALICE, SessionOwner(ISSUER, "mallory", "acme")):
        with pytest.raises(SessionNotFound):
            await binder.owner("files", SID, caller)
    await binder.end("files", "never-used")  # an unknown id stays unknown
    assert await binder.owner("files", "never-used", ALICE) == ALICE


async def test_idle_bindings_expire_and_use_refreshes() -> None:
    """A binding used within the idle TTL lives on; one left idle past it is forgotten."""
    clock = Clock()
    store = MemorySessionStore(ttl=60, clock=clock)
    await store.bind("k", ALICE)
    clock.now += 50
    assert await store.bind("k", SessionOwner(ISSUER, "mallory", None)) == ALICE
    clock.now += 50
    assert await store.bind("k", ALICE) == ALICE
    clock.now += 61
    mallory = SessionOwner(ISSUER, "mallory", None)
    assert await store.bind("k", mallory) == mallory


async def test_memory_is_bounded_and_one_principal_cannot_flush_others() -> None:
    """The store never exceeds its size; a principal past its cap loses its own oldest binding,
    never another principal's."""
    store = MemorySessionStore(max_bindings=50, max_per_principal=10)
    await store.bind("victim", ALICE)
    mallory = SessionOwner(ISSUER, "mallory", None)
    for i in range(1000):
        await store.bind(f"flood-{i}", mallory)
        assert len(store) <= 11
    assert await store.bind("victim", mallory) == ALICE
    assert await store.bind("flood-0", ALICE) == ALICE  # mallory's oldest went first
    many = MemorySessionStore(max_bindings=50, max_per_principal=1000)
    for i in range(200):
        await many.bind(f"k{i}", SessionOwner(ISSUER, f"u{i}", None))
    assert len(many) == 50


async def test_end_marks_ended_and_frees_the_principal_slot() -> None:
    """An ended record is ENDED and no longer counts against its owner's cap."""
    store = MemorySessionStore(max_per_principal=1)
    await store.bind("a", ALICE)
    await store.end("a")
    assert await store.bind("a", ALICE) is ENDED
    await store.bind("b", ALICE)
    assert await store.bind("b", SessionOwner(ISSUER, "x", None)) == ALICE


# ---------------------------------------------------------------------------------- Redis



@pytest.fixture
async def redis_stores(redis_url: str) -> AsyncIterator[tuple[RedisSessionStore, RedisSessionStore]]:
    admin = Redis.from_url(redis_url)
    await admin.flushdb()
    await admin.aclose()
    a = RedisSessionStore(redis_url, timeout=0.5, ttl=30)
    b = RedisSessionStore(redis_url, timeout=0.5, ttl=30)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_redis_bindings_are_shared_between_processes(
        redis_stores: tuple[RedisSessionStore, RedisSessionStore], redis_url: str) -> None:
    """A session bound through one ext_authz is owned in every other; ending it is seen by all;
    Redis holds a hashed key with an idle TTL, never the id."""
    a, b = SessionBinder(redis_stores[0]), SessionBinder(redis_stores[1])
    assert await a.owner("files", SID, ALICE) == ALICE
    with pytest.raises(SessionNotFound):
        await b.owner("files", SID, SessionOwner(ISSUER, "mallory", "acme"))
    assert await b.owner("files", SID, SessionOwner(ISSUER, "alice", "globex")) == ALICE
    admin = Redis.from_url(redis_url)
    try:
        keys = [k.decode() if isinstance(k, bytes) else k for k in await admin.keys("*")]
        assert keys == [REDIS_KEY_PREFIX + session_key("files", SID)]
        assert 0 < await admin.pttl(keys[0]) <= 30_000
        await b.end("files", SID)
        with pytest.raises(SessionNotFound):
            await a.owner("files", SID, ALICE)
        await admin.set(REDIS_KEY_PREFIX + session_key("files", "junk"), b"not json")
        with pytest.raises(SessionNotFound):
            await a.owner("files", "junk", ALICE)
    finally:
        await admin.aclose()


async def test_redis_down_fails_closed_fast() -> None:
    """Nothing listening: 503 session_store_unavailable, then refused without trying (back-off)."""
    store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        for _ in range(2):
            with pytest.raises(SessionStoreUnavailable) as info:
                await SessionBinder(store).owner("files", SID, ALICE)
            assert info.value.http_status == 503
    finally:
        await store.close()


# ------------------------------------------------------------------------ the servicer

def _servicer(settings: Any, session: aiohttp.ClientSession,
              engine: StubEngine) -> AuthorizationServicer:
    jwks = {i.issuer: JwksClient(i.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536,
                                 issuer=i.issuer) for i in settings.issuers}
    verifier = TokenVerifier({i.issuer: (i, jwks[i.issuer]) for i in settings.issuers},
                             settings.auth)
    return AuthorizationServicer(settings, verifier, MemoryRateLimiter(), engine)


async def _check(authz: AuthorizationServicer, name: str, token: str,
                 sid: str | None = SID) -> Any:
    req = check_request(name, token, headers={"mcp-session-id": sid} if sid else None)
    if sid is None:
        del req.attributes.request.http.headers["mcp-session-id"]
    return await authz.Check(req, None)


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession,
          rsa_key: SigningKey) -> tuple[AuthorizationServicer, StubEngine]:
    jwks_server.set_keys([rsa_key])
    settings = make_settings(jwks_server.url, issuers=[
        {"issuer": ISSUER, "jwks_url": jwks_server.url},
        {"issuer": ISSUER_B, "jwks_url": jwks_server.url}])
    engine = StubEngine()
    return _servicer(settings, session, engine), engine


async def test_servicer_binds_and_fills_the_policy_input(
        authz: tuple[AuthorizationServicer, StubEngine], rsa_key: SigningKey) -> None:
    """The owner's requests pass with input.session naming the owner and x-mcp-issuer upstream;
    a request without a session id has no input.session."""
    servicer, engine = authz
    headers, _ = upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))
    assert headers["x-mcp-issuer"] == ISSUER
    assert engine.inputs[-1]["session"] == {"iss": ISSUER, "sub": "alice", "tenant": "acme"}
    upstream(await _check(servicer, "get_sse_stream", token_for(rsa_key)))
    upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key), sid=None))
    assert "session" not in engine.inputs[-1]


@pytest.mark.parametrize("fixture", ["post_tools_call_files", "get_sse_stream", "delete_session"])
@pytest.mark.parametrize("claims", [{"sub": "mallory"}, {"issuer": ISSUER_B}],
                         ids=["other-sub", "other-issuer"])
async def test_servicer_refuses_another_principal_as_not_found(
        authz: tuple[AuthorizationServicer, StubEngine], rsa_key: SigningKey, fixture: str,
        claims: dict[str, str]) -> None:
    """POST, GET and DELETE with a foreign token: 404 session_not_found like an unknown id,
    without asking the policy; the session lives on for its owner."""
    servicer, engine = authz
    upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))
    asked = len(engine.inputs)
    status, _, body = denial(await _check(servicer, fixture, token_for(rsa_key, **claims)))
    assert status == 404 and body["error"]["code"] == SESSION_NOT_FOUND
    assert body["error"]["data"]["reason"] == "session_not_found" and len(engine.inputs) == asked
    upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))


@pytest.mark.parametrize("tenant", ["globex", None, "ACME"])
async def test_servicer_refuses_a_tenant_switch_even_if_the_policy_allows(
        authz: tuple[AuthorizationServicer, StubEngine], rsa_key: SigningKey,
        tenant: str | None) -> None:
    """Same sub in another or no tenant: the policy sees the owner's tenant; the stand-in policy
    allows, the gateway still answers 403 session_tenant_mismatch."""
    servicer, engine = authz
    upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))
    status, _, body = denial(await _check(servicer, "post_tools_call_files",
                                          token_for(rsa_key, tenant=tenant)))
    assert status == 403 and body["error"]["data"]["reason"] == "session_tenant_mismatch"
    assert engine.inputs[-1]["session"]["tenant"] == "acme"


async def test_servicer_delete_ends_the_session(
        authz: tuple[AuthorizationServicer, StubEngine], rsa_key: SigningKey) -> None:
    """The owner's DELETE passes; afterwards the id is 404 for the owner too."""
    servicer, _ = authz
    upstream(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))
    upstream(await _check(servicer, "delete_session", token_for(rsa_key)))
    status, _, _ = denial(await _check(servicer, "post_tools_call_files", token_for(rsa_key)))
    assert status == 404


@pytest.mark.parametrize("sid", ["a,b", "a b", "x" * (MAX_SESSION_ID_CHARS + 1)])
async def test_servicer_refuses_malformed_ids(
        authz: tuple[AuthorizationServicer, StubEngine], rsa_key: SigningKey, sid: str) -> None:
    """A malformed session id is 400 invalid_session_id before the policy."""
    servicer, engine = authz
    status, _, body = denial(await _check(servicer, "post_tools_call_files", token_for(rsa_key),
                                          sid=sid))
    assert status == 400 and body["error"]["data"]["reason"] == "invalid_session_id"
    assert engine.inputs == []


async def test_a_principal_at_its_cap_evicts_only_its_own_even_when_interleaved() -> None:
    """Bindings of many principals interleaved with a flooder's: the flooder's claims past its cap
    evict its own oldest, every other principal keeps its binding."""
    store = MemorySessionStore(max_bindings=10_000, max_per_principal=20)
    mallory = SessionOwner(ISSUER, "mallory", None)
    for i in range(500):
        await store.bind(f"user-{i}", SessionOwner(ISSUER, f"u{i}", "acme"))
        await store.bind(f"flood-{i}", mallory)
    for i in range(500):
        assert await store.bind(f"user-{i}", mallory) == SessionOwner(ISSUER, f"u{i}", "acme")
    assert len(store) == 520
