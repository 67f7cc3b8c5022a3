"""``mcp-gateway credentials set|list|revoke``: the per-user upstream credentials of the servers
whose ``credentials.kind`` is ``user_store`` (docs/upstream-credentials.md).

The value is read from standard input (or the environment variable ``--from-env`` names), never
from the command line, where other users of the machine could read it. The store key comes from
the secret the server's ``credentials.key`` names: this process's environment, else the dev
stack's generated secret (state_dir/secrets), as the running stack gets it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.credentials.config import UserStoreCredentials
from gateway.credentials.provider import header_value
from gateway.credentials.store import CredentialStore, StoreError, derive_keys
from gatewayctl.devstack.credentials import ensure_secrets


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("credentials", help="per-user upstream credentials (user_store)")
    sub = parser.add_subparsers(dest="credentials_command", required=True)

    def who(p: argparse.ArgumentParser, *, required: bool = True) -> None:
        p.add_argument("--server", required=required, help="the server (credentials.kind user_store)")
        p.add_argument("--sub", required=required, help="the user's subject (the token's sub)")
        p.add_argument("--issuer", help="the user's token issuer (default: the first configured)")

    p_set = sub.add_parser("set", help="register (or replace) a user's credential for a server; "
                                       "the value is read from stdin")
    who(p_set)
    p_set.add_argument("--from-env", metavar="VAR", help="read the value from this environment "
                                                        "variable instead of stdin")
    p_set.set_defaults(func=cmd_set)

    p_list = sub.add_parser("list", help="registered credentials (never their values)")
    p_list.add_argument("--server", help="only this server")
    p_list.add_argument("--sub", help="only this user")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)

    p_revoke = sub.add_parser("revoke", help="forget a user's credential for a server")
    who(p_revoke)
    p_revoke.set_defaults(func=cmd_revoke)


def _fail(message: str) -> int:
    print(f"mcp-gateway credentials: {message}", file=sys.stderr)
    return 2


def _store_servers(cfg: GatewayConfig) -> dict[str, UserStoreCredentials]:
    return {s.name: s.credentials for s in cfg.servers
            if isinstance(s.credentials, UserStoreCredentials)}


def _open(cfg: GatewayConfig, creds: UserStoreCredentials) -> CredentialStore:
    # Only the store's own key (made on first use as `up` would); no other secret is touched.
    secret = os.environ.get(creds.key) or ensure_secrets(cfg, (creds.key,)).get(creds.key, "")
    return CredentialStore(creds.path, derive_keys(secret))


def _resolve(args: argparse.Namespace) -> tuple[GatewayConfig, UserStoreCredentials, str]:
    cfg = load_config(args.config)
    stores = _store_servers(cfg)
    if args.server not in stores:
        names = ", ".join(sorted(stores)) or "none is configured"
        raise ConfigError(f"server {args.server!r} keeps no per-user credentials "
                          f"(credentials.kind user_store: {names})")
    issuer = args.issuer or cfg.issuers[0].issuer
    return cfg, stores[args.server], issuer


def cmd_set(args: argparse.Namespace) -> int:
    try:
        cfg, creds, issuer = _resolve(args)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.from_env:
        value = os.environ.get(args.from_env, "")
    else:
        value = sys.stdin.read()
    value = value.rstrip("\r\n")
    if header_value(creds.prefix, value) is None:
        return _fail("the credential must be one line of printable ASCII without surrounding "
                     "spaces (it is sent as a header value)")
    try:
        store = _open(cfg, creds)
        try:
            store.set(issuer, args.sub, args.server, value)
        finally:
            store.close()
    except (ValueError, StoreError) as exc:
        return _fail(str(exc))
    print(f"registered a credential of {args.sub} ({issuer}) for server {args.server}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    stores = _store_servers(cfg)
    if args.server is not None and args.server not in stores:
        return _fail(f"server {args.server!r} keeps no per-user credentials")
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    try:
        for name, creds in sorted(stores.items()):
            if creds.path in seen or (args.server is not None and name != args.server):
                continue
            seen.add(creds.path)
            store = _open(cfg, creds)
            try:
                for entry in store.list(server=args.server, sub=args.sub):
                    rows.append({"server": entry.server, "issuer": entry.issuer, "sub": entry.sub,
                                 "updated": datetime.fromtimestamp(entry.updated, UTC).isoformat(
                                     timespec="seconds")})
            finally:
                store.close()
    except (ValueError, StoreError) as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print("no credentials registered")
        return 0
    print(f"{'SERVER':<20} {'SUB':<24} {'UPDATED':<26} ISSUER")
    for row in rows:
        print(f"{row['server']!s:<20} {row['sub']!s:<24} {row['updated']!s:<26} {row['issuer']}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        cfg, creds, issuer = _resolve(args)
        store = _open(cfg, creds)
    except (ConfigError, ValueError, StoreError) as exc:
        return _fail(str(exc))
    try:
        found = store.revoke(issuer, args.sub, args.server)
    finally:
        store.close()
    if not found:
        return _fail(f"{args.sub} ({issuer}) has no credential for server {args.server}")
    print(f"revoked the credential of {args.sub} ({issuer}) for server {args.server}")
    return 0
