"""``mcp-gateway catalog list|approve|quarantine|refresh``: inspect and manage the pinned tool catalog."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.assertion import CATALOG_CALLER, signer_for
from gateway.catalog import Catalog, CatalogError, Entry
from gateway.catalog.client import CATALOG_IDENTITY, FetchError, fetch_listing
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.mcp import LATEST_HANDSHAKE_VERSION
from gateway.policy.factory import build_engine
from gateway.upstream import UpstreamError, targets
from gateway.wire import ASSERTION_HEADER

REFRESH_TIMEOUT_S = 30.0

# "Which roles may call each tool": (config, entries, scope) -> {(server, tool): [roles]}, or None
# when the policy cannot be asked (no config, or no role list in its data).
RolesResolver = Callable[[GatewayConfig | None, list[Entry], str],
                         dict[tuple[str, str], list[str]] | None]
LIST_ENTRYPOINT = "mcp/authz/visible_tools"
# A listing identity per role: a tenant every server admits in the example policy, and by default
# the server-wide scope, so what remains is the role's grant (and the organisation rules').
PROBE_TENANT = "catalog-probe"
# The token scope of the listing identity; {server} is each server's name.
DEFAULT_PROBE_SCOPE = "tools:call:{server}/*"


def _policy_roles(cfg: GatewayConfig) -> list[str]:
    data_file = Path(cfg.policy.dir) / "data.json"
    try:
        data = orjson.loads(data_file.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    roles = data.get("gateway", {}).get("roles", {}) if isinstance(data, dict) else {}
    return sorted(roles) if isinstance(roles, dict) else []


async def _ask_policy(cfg: GatewayConfig, tools: dict[str, list[str]], roles: list[str],
                      scope: str = DEFAULT_PROBE_SCOPE) -> dict[tuple[str, str], list[str]]:
    engine = build_engine(cfg.policy)
    await engine.start()
    out: dict[tuple[str, str], list[str]] = {}
    try:
        # One query per (server, role) for all of that server's tools, as ext_proc filters lists.
        for server, names in tools.items():
            for role in roles:
                visible = await engine.query(LIST_ENTRYPOINT, {
                    "token": {"sub": "catalog-probe", "roles": [role], "tenant": PROBE_TENANT,
                              "scope": scope.replace("{server}", server)},
                    "server": {"name": server}, "kind": "tools", "items": names})
                for name in visible or ():
                    out.setdefault((server, name), []).append(role)
    finally:
        await engine.close()
    return out


def _roles_from_policy(cfg: GatewayConfig | None, entries: list[Entry],
                       scope: str = DEFAULT_PROBE_SCOPE) -> dict[tuple[str, str], list[str]] | None:
    if cfg is None:
        return None
    roles = _policy_roles(cfg)
    if not roles:
        return None
    tools: dict[str, list[str]] = {}
    for e in entries:
        if e.kind == "tool":
            tools.setdefault(e.server, []).append(e.name)
    return asyncio.run(_ask_policy(cfg, tools, roles, scope))


roles_resolver: RolesResolver = _roles_from_policy


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("catalog", help="inspect and approve pinned tool definitions")
    sub = parser.add_subparsers(dest="catalog_command", required=True)

    def db_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", help="catalog database (default: <state_dir>/catalog.sqlite)")

    p_list = sub.add_parser("list", help="servers, tools, pins, state and findings")
    db_arg(p_list)
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.add_argument("--kind", choices=("tool", "resource", "prompt", "all"), default="tool")
    p_list.add_argument("--scope", default=DEFAULT_PROBE_SCOPE,
                        help="token scope of the identity each role is listed as ({server}: the "
                             f"server's name; default {DEFAULT_PROBE_SCOPE!r}): ROLES then shows "
                             "who sees each tool with that scope, organisation rules included")
    p_list.set_defaults(func=cmd_list)

    p_approve = sub.add_parser("approve", help="approve the current definition of <server>/<tool>")
    db_arg(p_approve)
    p_approve.add_argument("target", help="<server>/<tool>")
    p_approve.add_argument("--kind", choices=("tool", "resource", "prompt"), default="tool")
    p_approve.add_argument("--hash", dest="expected_hash", metavar="SHA256",
                           help="approve only if the current definition has this hash (the full "
                                "64 hex digits of the definition you reviewed, as `catalog list "
                                "--json` or the console show it); a definition changed since is "
                                "refused (definition_changed)")
    p_approve.set_defaults(func=cmd_approve)

    p_quarantine = sub.add_parser("quarantine", help="withdraw <server>/<tool>: hidden from lists and "
                                  "its calls refused until approved again")
    db_arg(p_quarantine)
    p_quarantine.add_argument("target", help="<server>/<tool>")
    p_quarantine.add_argument("--kind", choices=("tool", "resource", "prompt"), default="tool")
    p_quarantine.add_argument("--reason", help="why (kept in the catalog's audit events)")
    p_quarantine.set_defaults(func=cmd_quarantine)

    p_refresh = sub.add_parser("refresh", help="fetch tools/resources/prompts from every server")
    db_arg(p_refresh)
    p_refresh.add_argument("--server", action="append", help="only this server (repeatable)")
    p_refresh.add_argument("--protocol-version", default=LATEST_HANDSHAKE_VERSION)
    p_refresh.add_argument("--mode", choices=("tofu", "require_approval"), default="tofu",
                           help="first sight: trust (tofu, default) or wait for approval")
    p_refresh.set_defaults(func=cmd_refresh)


def _config(args: argparse.Namespace, *, required: bool) -> GatewayConfig | None:
    try:
        return load_config(getattr(args, "config", None))
    except ConfigError:
        if required:
            raise
        return None


def _open(args: argparse.Namespace, cfg: GatewayConfig | None, mode: str = "tofu") -> Catalog:
    if args.db:
        path = Path(args.db)
    elif cfg is not None:
        path = Path(cfg.catalog.path)  # the same file ext_authz and ext_proc use
    else:
        raise CatalogError("no --db given and the gateway config cannot be loaded")
    return Catalog(path, mode=mode)


def _fail(message: str) -> int:
    print(f"mcp-gateway catalog: {message}", file=sys.stderr)
    return 2


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _config(args, required=False)
    try:
        catalog = _open(args, cfg)
    except CatalogError as exc:
        return _fail(exc.message)
    with catalog:
        kind = None if args.kind == "all" else args.kind
        entries = catalog.entries(kind=kind)
        shadowed = catalog.shadowed_names()
        roles = roles_resolver(cfg, entries, args.scope)
    rows = []
    for e in entries:
        findings = [f"hidden chars {','.join(f['chars'])} in {f['field']}" for f in e.findings]
        if e.kind == "tool" and e.name in shadowed:
            others = [s for s in shadowed[e.name] if s != e.server]
            findings.append(f"same name on {', '.join(others)}")
        rows.append({**e.as_dict(), "findings": findings,
                     "roles": None if roles is None else roles.get((e.server, e.name), [])})
    if args.json:
        sys.stdout.write(orjson.dumps({"items": rows, "shadowed": shadowed,
                                       "roles_wired": roles is not None,
                                       "scope": args.scope},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    header = ("SERVER", "KIND", "NAME", "HASH", "STATE", "ROLES", "FINDINGS")
    table = [header]
    for r in rows:
        state = r["state"] if r["present"] else f"{r['state']} (gone)"
        roles_text = "(no policy roles)" if r["roles"] is None else (",".join(r["roles"]) or "-")
        table.append((r["server"], r["kind"], r["name"], r["hash"][:12], state, roles_text,
                      "; ".join(r["findings"]) or "-"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(c).ljust(widths[i]) for i, c in enumerate(row[:-1])]
        print("  ".join([*cells, str(row[-1])]))
    if len(table) == 1:
        print("(catalog is empty: run `mcp-gateway catalog refresh`)")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    server, sep, name = args.target.partition("/")
    if not sep or not server or not name:
        return _fail("approve takes <server>/<tool>")
    expected = args.expected_hash
    if expected is not None and not _is_sha256(expected):
        return _fail("--hash takes the full SHA-256 of the reviewed definition (64 hex digits)")
    try:
        catalog = _open(args, _config(args, required=False))
        with catalog:
            entry = catalog.approve(server, name, kind=args.kind, actor=f"cli:{getpass.getuser()}",
                                    expected_hash=expected)
    except CatalogError as exc:
        return _fail(f"{exc.code}: {exc.message}" if exc.code == "definition_changed" else exc.message)
    print(f"approved {entry.server}/{entry.name} ({entry.kind}) at {entry.hash[:12]}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    server, sep, name = args.target.partition("/")
    if not sep or not server or not name:
        return _fail("quarantine takes <server>/<tool>")
    try:
        catalog = _open(args, _config(args, required=False))
        with catalog:
            entry = catalog.quarantine(server, name, kind=args.kind, actor=f"cli:{getpass.getuser()}",
                                       reason=args.reason)
    except CatalogError as exc:
        return _fail(exc.message)
    print(f"quarantined {entry.server}/{entry.name} ({entry.kind}): {entry.quarantine_reason} "
          f"(approve it again with `mcp-gateway catalog approve {entry.server}/{entry.name}`)")
    return 0


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


def _assertion(cfg: GatewayConfig, server: str) -> Callable[[], dict[str, str]] | None:
    """Fresh assertion headers naming the gateway's catalog towards ``server`` (signed with the
    key file, as ext_authz does), or None when identity.assertion is off."""
    if not cfg.identity.assertion:
        return None
    signer = signer_for(cfg.identity, cfg.public_url)
    audience = cfg.server_audience(server)
    return lambda: {ASSERTION_HEADER: signer.mint(CATALOG_CALLER, audience, "cli-catalog-refresh")}


async def _refresh(cfg: GatewayConfig, catalog: Catalog, servers: list[str] | None,
                   version: str) -> int:
    failures = 0
    # With identity.assertion on, servers accept only the gateway's signed assertion.
    identity = {} if cfg.identity.assertion else CATALOG_IDENTITY
    timeout = aiohttp.ClientTimeout(total=REFRESH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for server in cfg.servers:
            if servers and server.name not in servers:
                continue
            listing = None
            errors = []
            try:
                endpoints = targets(server, os.environ)  # a url server: its URL, TLS, headers
            except UpstreamError as exc:
                endpoints = ()
                errors.append(exc.message)
            for target in endpoints:
                url = target.url
                try:
                    listing = await fetch_listing(http, target, headers=identity,
                                                  protocol_version=version,
                                                  per_request=_assertion(cfg, server.name))
                    break
                except FetchError as exc:
                    errors.append(f"{url}: {exc.message}")
                except TimeoutError:
                    errors.append(f"{url}: timed out after {REFRESH_TIMEOUT_S:.0f}s")
            if listing is None:
                failures += 1
                print(f"{server.name}: FAILED ({'; '.join(errors)})", file=sys.stderr)
                continue
            summary = []
            for kind, items in (("tool", listing.tools), ("resource", listing.resources),
                                ("prompt", listing.prompts)):
                report = catalog.refresh(server.name, items, kind=kind, actor="cli:refresh")
                summary.append(f"{len(items)} {kind}s (+{len(report.added)} ~{len(report.changed)} "
                               f"-{len(report.removed)})")
                for name in report.changed:
                    print(f"{server.name}/{name}: definition changed -> quarantined "
                          f"(approve with `mcp-gateway catalog approve {server.name}/{name}`)")
            print(f"{server.name}: {', '.join(summary)}")
    return 1 if failures else 0


def cmd_refresh(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args, required=True)
        assert cfg is not None
        catalog = _open(args, cfg, mode=args.mode)
    except (ConfigError, CatalogError) as exc:
        return _fail(str(exc))
    unknown = set(args.server or ()) - {s.name for s in cfg.servers}
    if unknown:
        return _fail(f"unknown server(s): {', '.join(sorted(unknown))}")
    with catalog:
        return asyncio.run(_refresh(cfg, catalog, args.server, args.protocol_version))
