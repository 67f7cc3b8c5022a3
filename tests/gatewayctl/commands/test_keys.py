"""`mcp-gateway keys`: the caller assertion's keys made, rotated in three steps and published."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.assertion import KeyRing
from gateway.config import load_config
from gatewayctl.cli import main
from tests.e2e.helpers import stack_config


def _kids(path: Path) -> list[str]:
    doc: dict[str, Any] = orjson.loads(path.read_bytes())
    return [k["kid"] for k in doc["keys"]]


def test_rotation_steps_publish_before_signing_and_retire_after(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init -> add (published, not signing) -> promote (signs) -> retire (only it is left), the
    key file private and the JWKS without private members at every step."""
    cfg = stack_config(tmp_path, extra={"identity": {"assertion": True}})
    identity = load_config(cfg).identity
    keys, jwks = Path(identity.keys), Path(identity.jwks_file)
    assert main(["--config", str(cfg), "keys", "init"]) == 0
    first = _kids(keys)
    assert len(first) == 1 and _kids(jwks) == first
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert main(["--config", str(cfg), "keys", "init"]) == 1  # never overwrites a key file

    assert main(["--config", str(cfg), "keys", "add"]) == 0
    old, new = _kids(keys)
    assert old == first[0] and _kids(jwks) == [old, new]
    assert KeyRing.load(keys).signing.kid == old

    assert main(["--config", str(cfg), "keys", "promote"]) == 0
    assert KeyRing.load(keys).signing.kid == new and _kids(jwks) == [new, old]

    assert main(["--config", str(cfg), "keys", "retire"]) == 0
    assert _kids(keys) == [new] and _kids(jwks) == [new]
    assert all("d" not in k for k in orjson.loads(jwks.read_bytes())["keys"])
    capsys.readouterr()
    assert main(["--config", str(cfg), "keys", "list"]) == 0
    assert capsys.readouterr().out.strip() == f"{new}\tsigning"


def test_promote_of_an_unknown_kid_changes_nothing(tmp_path: Path) -> None:
    """Promoting a kid the file does not hold fails and leaves both files as they were."""
    cfg = stack_config(tmp_path, extra={"identity": {"assertion": True}})
    identity = load_config(cfg).identity
    assert main(["--config", str(cfg), "keys", "init"]) == 0
    before = Path(identity.keys).read_bytes(), Path(identity.jwks_file).read_bytes()
    assert main(["--config", str(cfg), "keys", "promote", "--kid", "nope"]) == 1
    assert (Path(identity.keys).read_bytes(), Path(identity.jwks_file).read_bytes()) == before
