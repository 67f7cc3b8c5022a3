"""``mcp-gateway credentials set|list|revoke``: the value from stdin or an environment variable
(never argv, never printed), the store key from the named secret, clear refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, load_config
from gateway.credentials.store import CredentialStore, derive_keys
from gatewayctl import cli, devstack
from gatewayctl.devstack.credentials import ensure_secrets, upstream_secrets
from gatewayctl.devstack.state import paths
from gatewayctl.devstack.supervisor import _component_env

KEY = "cli-store-key-0123456789"
VALUE = "cli-user-credential-XYZ"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.pop("virtual_servers", None)
    raw["state_dir"] = str(tmp_path / "state")
    raw["secrets"] = [*raw.get("secrets", []), "STORE_KEY"]
    raw["servers"]["files"] = {"url": "http://127.0.0.1:9201/mcp",
                               "credentials": {"kind": "user_store", "key": "STORE_KEY"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("STORE_KEY", KEY)
    return path


def _run(config: Path, *args: str, stdin: str = "") -> int:
    import sys
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return cli.main(["--config", str(config), "credentials", *args])
    finally:
        sys.stdin = old


def test_set_list_revoke(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """set stores the value sealed (for the default issuer), list shows who without the value,
    revoke forgets it and a second revoke says there is none."""
    assert _run(config, "set", "--server", "files", "--sub", "alice", stdin=VALUE + "\n") == 0
    store = CredentialStore(tmp_path / "state" / "credentials.sqlite", derive_keys(KEY))
    assert store.get("https://dev-issuer.mcp-gateway.local", "alice", "files") == VALUE
    store.close()
    assert _run(config, "list", "--json") == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert [(r["server"], r["sub"]) for r in rows] == [("files", "alice")]
    assert VALUE not in out
    assert _run(config, "revoke", "--server", "files", "--sub", "alice") == 0
    assert _run(config, "revoke", "--server", "files", "--sub", "alice") == 2
    assert "has no credential" in capsys.readouterr().err


def test_set_from_env_and_refusals(config: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--from-env reads the value there; a server without a user store, or a multi-line value,
    is refused naming the problem."""
    monkeypatch.setenv("MY_CRED", VALUE)
    assert _run(config, "set", "--server", "files", "--sub", "bob", "--from-env", "MY_CRED") == 0
    assert _run(config, "set", "--server", "database", "--sub", "bob", stdin=VALUE) == 2
    assert "keeps no per-user credentials" in capsys.readouterr().err
    assert _run(config, "set", "--server", "files", "--sub", "bob", stdin="two\nlines") == 2
    assert "one line of printable ASCII" in capsys.readouterr().err


def _upstream_config(tmp_path: Path) -> Path:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.pop("virtual_servers", None)
    raw["state_dir"] = str(tmp_path / "state")
    raw["secrets"] = [*raw.get("secrets", []), "UP_STATIC", "STS_SECRET", "STORE_KEY"]
    raw["servers"]["crm"] = {"url": "https://crm.example/mcp", "credentials": {
        "kind": "static", "secret": "UP_STATIC"}}
    raw["servers"]["sts"] = {"url": "https://sts-user.example/mcp", "credentials": {
        "kind": "token_exchange", "token_endpoint": "https://sts.example/token",
        "client_id": "gateway", "client_secret": "STS_SECRET"}}
    raw["servers"]["files"] = {"url": "http://127.0.0.1:9201/mcp",
                               "credentials": {"kind": "user_store", "key": "STORE_KEY"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_upstream_credentials_are_never_generated(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev stack generates gateway-internal secrets (the store key) but never a static
    credential or a token exchange's client secret: unset, they stay absent (so their server
    answers 503), and the components' environment goes without them; a value the operator put
    in state_dir/secrets is used."""
    for name in ("UP_STATIC", "STS_SECRET", "STORE_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(_upstream_config(tmp_path))
    assert upstream_secrets(cfg) == {"UP_STATIC", "STS_SECRET"}
    values = ensure_secrets(cfg)
    assert "UP_STATIC" not in values and "STS_SECRET" not in values
    assert len(values["STORE_KEY"]) >= 32
    folder = paths(cfg).secrets_dir
    assert not (folder / "UP_STATIC").exists() and not (folder / "STS_SECRET").exists()
    (folder / "UP_STATIC").write_text("operator-value\n", encoding="utf-8")
    assert ensure_secrets(cfg)["UP_STATIC"] == "operator-value"
    ext_authz = [c for c in devstack.plan(cfg, ext_proc=False) if c.name == "ext_authz"]
    assert ext_authz and {"STS_SECRET", "UP_STATIC"} <= set(ext_authz[0].env)
    env = _component_env({}, ext_authz[0], ensure_secrets(cfg))
    assert "STS_SECRET" not in env and env["UP_STATIC"] == "operator-value"


def test_the_cli_writes_no_secret_but_its_store_key(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`credentials set` makes (or reads) only the store's own key in state_dir/secrets: no
    other configured secret is generated by it."""
    for name in ("UP_STATIC", "STS_SECRET", "STORE_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = _upstream_config(tmp_path)
    assert _run(config, "set", "--server", "files", "--sub", "alice", stdin=VALUE) == 0
    folder = paths(load_config(config)).secrets_dir
    assert sorted(p.name for p in folder.iterdir()) == ["STORE_KEY"]
