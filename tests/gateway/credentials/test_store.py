"""The per-user credential store: values sealed at rest (the raw files never hold them), bound to
their row, opened with the configured key only (a wrong key fails closed), rotation with two
keys; and the provider's answers for user_store servers (the credential, or a clear refusal)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.caller import Caller
from gateway.credentials.config import UserStoreCredentials
from gateway.credentials.errors import CredentialMissing, CredentialUnavailable
from gateway.credentials.provider import CredentialProvider
from gateway.credentials.store import CredentialStore, StoreError, derive_keys

KEY = "store-key-0123456789abcdef"
OTHER_KEY = "another-key-0123456789abcdef"
VALUE = "crm-personal-token-SECRET-42"
ISS = "https://idp.example"


def _store(path: Path, key: str = KEY) -> CredentialStore:
    return CredentialStore(path, derive_keys(key))


def test_round_trip_list_and_revoke(tmp_path: Path) -> None:
    """set, get, list (without values) and revoke, keyed by issuer, subject and server."""
    store = _store(tmp_path / "c.sqlite")
    store.set(ISS, "alice", "crm", VALUE)
    store.set(ISS, "alice", "crm", VALUE + "-v2")  # replaced, not added
    assert store.get(ISS, "alice", "crm") == VALUE + "-v2"
    assert store.get(ISS, "alice", "erp") is None
    assert store.get("https://other-idp", "alice", "crm") is None  # a sub is unique per issuer
    (entry,) = store.list()
    assert (entry.issuer, entry.sub, entry.server) == (ISS, "alice", "crm")
    assert store.revoke(ISS, "alice", "crm") and not store.revoke(ISS, "alice", "crm")
    assert store.get(ISS, "alice", "crm") is None
    store.close()


def test_the_raw_files_do_not_hold_the_value(tmp_path: Path) -> None:
    """Encryption at rest: neither the database file nor its WAL contains the value."""
    path = tmp_path / "c.sqlite"
    store = _store(path)
    store.set(ISS, "alice", "crm", VALUE)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c.sqlite"))
    assert b"alice" in raw  # the lookup key is stored in the clear, as documented
    assert VALUE.encode() not in raw and b"SECRET-42" not in raw
    assert store.get(ISS, "alice", "crm") == VALUE
    store.close()
    assert (path.stat().st_mode & 0o777) == 0o600


def test_wrong_key_fails_closed(tmp_path: Path) -> None:
    """A store opened with another key refuses to answer (never an empty or wrong value)."""
    path = tmp_path / "c.sqlite"
    store = _store(path)
    store.set(ISS, "alice", "crm", VALUE)
    store.close()
    wrong = _store(path, OTHER_KEY)
    with pytest.raises(StoreError, match="key that is not configured"):
        wrong.get(ISS, "alice", "crm")
    wrong.close()


def test_a_value_moved_to_another_row_does_not_open(tmp_path: Path) -> None:
    """The row's issuer, subject and server are bound to the sealed value."""
    path = tmp_path / "c.sqlite"
    store = _store(path)
    store.set(ISS, "alice", "crm", VALUE)
    store.set(ISS, "mallory", "crm", "mine")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE credentials SET nonce = (SELECT nonce FROM credentials WHERE sub = 'alice'),"
                   " sealed = (SELECT sealed FROM credentials WHERE sub = 'alice') WHERE sub = 'mallory'")
    with pytest.raises(StoreError, match="does not open"):
        store.get(ISS, "mallory", "crm")
    store.close()


def test_rotation_opens_old_values_and_seals_with_the_new_key(tmp_path: Path) -> None:
    """With "new,old" configured, values sealed under the old key still open; new ones use the new."""
    path = tmp_path / "c.sqlite"
    old = _store(path)
    old.set(ISS, "alice", "crm", VALUE)
    old.close()
    both = _store(path, f"{OTHER_KEY},{KEY}")
    assert both.get(ISS, "alice", "crm") == VALUE
    both.set(ISS, "bob", "crm", "bobs")
    both.close()
    new_only = _store(path, OTHER_KEY)
    assert new_only.get(ISS, "bob", "crm") == "bobs"
    new_only.close()


def test_short_keys_are_refused() -> None:
    """A store key shorter than 16 characters (or none) is refused."""
    for secret in ("", "short", f"{KEY},tiny"):
        with pytest.raises(ValueError, match="at least 16"):
            derive_keys(secret)


CALLER = Caller(sub="alice", issuer=ISS, tenant="acme")


async def test_provider_answers_the_credential_or_tells_the_user_what_to_do(tmp_path: Path) -> None:
    """Registered: the header with the value; not registered: 403 telling how to register;
    revoked: the same refusal again."""
    creds = UserStoreCredentials(str(tmp_path / "c.sqlite"), "STORE_KEY")
    provider = CredentialProvider({"crm": creds}, {"STORE_KEY": KEY})
    try:
        with pytest.raises(CredentialMissing) as err:
            await provider.headers("crm", CALLER, "client-token")
        assert err.value.http_status == 403 and err.value.code == "upstream_credential_missing"
        assert "mcp-gateway credentials set --server crm" in err.value.message
        assert err.value.data == {"server": "crm", "action": "register_credential"}
        store = _store(tmp_path / "c.sqlite")
        store.set(ISS, "alice", "crm", VALUE)
        assert await provider.headers("crm", CALLER, "client-token") == {"authorization": f"Bearer {VALUE}"}
        store.revoke(ISS, "alice", "crm")
        store.close()
        with pytest.raises(CredentialMissing):
            await provider.headers("crm", CALLER, "client-token")
    finally:
        await provider.close()


@pytest.mark.parametrize("environ", [{}, {"STORE_KEY": OTHER_KEY}])
async def test_provider_without_the_right_key_fails_closed(tmp_path: Path, environ: dict[str, str]) -> None:
    """No key secret, or a key that does not open the value: 503, never the value or a pass."""
    store = _store(tmp_path / "c.sqlite")
    store.set(ISS, "alice", "crm", VALUE)
    store.close()
    provider = CredentialProvider({"crm": UserStoreCredentials(str(tmp_path / "c.sqlite"), "STORE_KEY")},
                                  environ)
    try:
        with pytest.raises(CredentialUnavailable) as err:
            await provider.headers("crm", CALLER, "client-token")
        assert err.value.http_status == 503
    finally:
        await provider.close()
