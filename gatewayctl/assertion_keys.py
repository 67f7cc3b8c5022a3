"""The gateway's caller-assertion keys on disk (``identity.keys`` and ``identity.jwks_file``):
made on first ``up`` when they live in state_dir, and rotated in three steps (docs/identity.md):

1. ``add``: a new key goes last: published, not signing yet. Servers learn it (a JWKS file
   is re-read on an unknown kid; Envoy's published copy needs ``mcp-gateway reload``).
2. ``promote``: the newest key moves first and signs (ext_authz follows the key file within
   ``KEY_FILE_POLL_SECONDS``); the old one stays published.
3. ``retire``: once every assertion the old key signed has expired (60 s + leeway), every key
   but the signing one is removed from both files.

Each step rewrites the private key file (0600) and the public JWKS file atomically, JWKS
first when a key is added (a server must know a key before it sees an assertion signed by it)
and key file first when one is removed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

from gateway.assertion import KeyFileError, KeyRing, new_private_jwk
from gateway.config import GatewayConfig, IdentityConfig

logger = logging.getLogger(__name__)


class KeysError(RuntimeError):
    """A rotation step cannot be done; the message says why."""


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)  # atomic: a reader sees the old file or the new one


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def read_keys(identity: IdentityConfig) -> list[dict[str, Any]]:
    path = Path(identity.keys)
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KeysError(f"identity.keys {path}: {exc}") from None
    try:
        KeyRing.from_jwks(doc, str(path))
    except KeyFileError as exc:
        raise KeysError(str(exc)) from None
    keys: list[dict[str, Any]] = doc["keys"]
    return keys


def write_keys(identity: IdentityConfig, keys: list[dict[str, Any]], *, jwks_first: bool) -> None:
    """Both files for ``keys`` (the first signs)."""
    ring = KeyRing.from_jwks({"keys": keys})
    private = orjson.dumps({"keys": keys}, option=orjson.OPT_INDENT_2) + b"\n"
    public = orjson.dumps(ring.public_jwks(), option=orjson.OPT_INDENT_2) + b"\n"
    steps = [(Path(identity.jwks_file), public, 0o644), (Path(identity.keys), private, 0o600)]
    for path, data, mode in steps if jwks_first else reversed(steps):
        _write(path, data, mode)


def ensure(config: GatewayConfig) -> None:
    """The dev stack's keys: made when identity.assertion is on and the key file, in state_dir,
    is missing; the published JWKS is written again from the key file either way. A key file
    the operator placed elsewhere is never invented (a missing one is an error)."""
    identity = config.identity
    if not identity.assertion:
        return
    path = Path(identity.keys)
    if not path.exists():
        if not _inside(path, Path(config.state_dir)):
            raise KeysError(f"identity.keys {path} does not exist (`mcp-gateway keys init` makes "
                            f"one)")
        write_keys(identity, [new_private_jwk()], jwks_first=True)
        logger.info("created the caller assertion key %s", path)
        return
    write_keys(identity, read_keys(identity), jwks_first=True)


def init(identity: IdentityConfig) -> str:
    if Path(identity.keys).exists():
        raise KeysError(f"{identity.keys} exists already (rotate with `keys add`)")
    key = new_private_jwk()
    write_keys(identity, [key], jwks_first=True)
    return str(key["kid"])


def add(identity: IdentityConfig) -> str:
    """Step 1: a new key, published, not signing."""
    keys = read_keys(identity)
    key = new_private_jwk()
    write_keys(identity, [*keys, key], jwks_first=True)
    return str(key["kid"])


def promote(identity: IdentityConfig, kid: str | None = None) -> str:
    """Step 2: ``kid`` (default: the newest key) signs from now on."""
    keys = read_keys(identity)
    target = kid or str(keys[-1]["kid"])
    chosen = [k for k in keys if k["kid"] == target]
    if not chosen:
        raise KeysError(f"no key {target!r} in {identity.keys}")
    write_keys(identity, [*chosen, *(k for k in keys if k["kid"] != target)], jwks_first=True)
    return target


def retire(identity: IdentityConfig) -> list[str]:
    """Step 3: every key but the signing one leaves both files."""
    keys = read_keys(identity)
    write_keys(identity, keys[:1], jwks_first=False)
    return [str(k["kid"]) for k in keys[1:]]
