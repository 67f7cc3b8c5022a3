"""The assertion's key files going wrong: a signing key file deleted during a run is reported
once, a server's JWKS file that cannot be read at start names the file and its flag."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from gateway.assertion import JwksFileKeys, KeyFile, KeyFileError, KeyRing, new_private_jwk


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_deleted_key_file_is_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The signer keeps its key in memory when the file is deleted, and says so once (not at
    every poll); once the file is back, a later deletion is warned again."""
    key = new_private_jwk()
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps({"keys": [key]}))
    mono = Clock()
    keyfile = KeyFile(path, poll=1.0, clock=mono)
    caplog.set_level(logging.WARNING, logger="gateway.assertion")
    path.unlink()
    for step in range(1, 4):
        mono.now = float(step)
        assert keyfile.current().signing.kid == key["kid"]
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and str(path) in gone[0].getMessage()
    assert gone[0].levelno == logging.WARNING
    path.write_bytes(orjson.dumps({"keys": [key]}))
    mono.now = 5.0
    keyfile.current()
    path.unlink()
    mono.now = 6.0
    keyfile.current()
    assert len([r for r in caplog.records if "is gone" in r.getMessage()]) == 2


@pytest.mark.parametrize("content", [None, b"{ not json", b'{"keys": "no"}', b'{"keys": []}'])
def test_a_bad_jwks_file_at_start_names_the_file_and_the_flag(tmp_path: Path,
                                                               content: bytes | None) -> None:
    """A missing, non-JSON or keyless JWKS file refuses the server's start with an error naming
    --assertion-jwks and the file (not a bare decode error)."""
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=rf"--assertion-jwks {path}: not a readable JWKS file"):
        JwksFileKeys(path)
    path.write_bytes(orjson.dumps(KeyRing.from_jwks({"keys": [new_private_jwk()]}).public_jwks()))
    JwksFileKeys(path)
