"""``python -m gatewayctl.compose_init``: docker compose's one-shot ``pki-init`` service.

It issues the inner TLS certificates of the compose gateway config (inner_tls: Envoy, ext_authz,
ext_proc, the aggregator, each module server and, with a ``console:`` section, the console) from
a CA kept in a folder only this service mounts (``--pki``), with the dev stack's issuance
(``gatewayctl.devstack.credentials.issue_inner_tls``: a certificate names ``<identity>.<domain>``
and the component's hosts), and copies each component's pair and the CA certificate into that
component's own folder under ``--out`` (``<out>/<identity>/tls.crt``, ``tls.key``, ``ca.crt``: the
layout of a cert-manager Secret), owned by the user that component runs as. Each folder is a
volume mounted read-only by that component only, so no container holds another's key.

Run again it issues only what is missing; ``--rotate`` reissues every pair (the files are replaced
by renames, key first: Envoy and the Python services pick the new pair up without a restart).

Under identity.assertion it also makes the caller assertion's key file (``identity.keys``) and its
public JWKS (``identity.jwks_file``) when the key file is missing (``mcp-gateway keys init``), and
hands both to the services' user: the key file 0600 in a folder only ext_authz mounts, the JWKS
0644 for Envoy, the servers and the aggregators. Rotation is ``mcp-gateway keys add|promote|retire``
run as that user (deploy/compose/README.md).
With ``--edge-src`` / ``--edge-out`` it also copies the edge certificate and key (``server.pem``,
``server.key``, as ``mcp-gateway up`` makes them or the operator provides them) into the volume
Envoy mounts, owned by Envoy's user: the host's copy of the key is private to the host user, whom
Envoy's container user (101) is not.

It also makes the audit keys when missing, 0600 for the services' user, on the volume the audit
writers (ext_authz, the MCP servers) mount read-only: audit.signing_key (Ed25519, signing their
checkpoints) and, with audit.master_key set and ``<name>_FILE`` in its environment, the master
key (sealing personal fields, docs/compliance.md) in that file. Neither is ever replaced (a new
signing key mid-chain, or entries sealed under keys the old master key wraps, would not verify or
open).

With ``--delegation-key`` / ``--delegation-jwks`` it makes the workflow server's delegation key
(the private JWK set signing its per-step tokens) when missing, never replacing it, 0600 for the
services' user in a folder only the workflow server mounts, and writes its public JWKS (0644) on
the volume the ``workflow-jwks`` file server publishes to ext_authz (the issuer's jwks_url).
With ``--edge-ca-out`` it copies the edge certificate's CA (``ca.pem`` next to the edge pair, as
``mcp-gateway up`` makes it) into that folder, readable by all: the workflow server checks Envoy's
edge certificate against it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import inner_tls
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.telemetry.audit_chain import generate_signing_key
from gateway.telemetry.audit_keys import new_master_key
from gatewayctl import assertion_keys
from gatewayctl.devstack import credentials
from gatewayctl.devstack.state import StackError
from mcp_servers.workflow.delegation import load_or_create_key, publish_jwks

SERVICE_UID = 10001  # the gateway image's user (Dockerfile)
ENVOY_UID = 101  # the envoy image's `envoy` user (docker-compose.yml sets ENVOY_UID to it)
PROMETHEUS_UID = 65534  # the prometheus image's `nobody`
# Prometheus scrapes the servers' and aggregators' /metrics, which share their TLS port: it gets a
# client-only certificate (no serverAuth, so no component can be impersonated with it). It opens
# a TLS connection to those ports, nothing more: with identity.assertion on, a request without the
# gateway's signed assertion is refused.
SCRAPER = "prometheus"


def pki_config(config: GatewayConfig, pki: Path) -> GatewayConfig:
    """``config`` with the CA and every issued pair under ``pki`` (the dev stack's layout)."""
    folder = pki / "inner"
    it = replace(config.inner_tls, dir=str(folder), ca_file=str(folder / "ca.pem"),
                 cert_file=str(folder / f"{inner_tls.ENVOY}.pem"),
                 key_file=str(folder / f"{inner_tls.ENVOY}.key"))
    return replace(config, state_dir=str(pki), inner_tls=it)


def _install(data: bytes, target: Path, mode: int, uid: int) -> bool:
    """Write ``target`` by rename (readers see the old or the new file); False when unchanged."""
    if target.exists() and target.read_bytes() == data:
        os.chmod(target, mode)
        if os.geteuid() == 0:
            os.chown(target, uid, uid)
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    if os.geteuid() == 0:
        os.chown(tmp, uid, uid)
    tmp.replace(target)
    return True


def issue_scraper(config: GatewayConfig, *, rotate: bool) -> bool:
    """The scraper's client certificate (``SCRAPER``) from the same CA, next to the others."""
    it = config.inner_tls
    cert, key = Path(it.dir) / f"{SCRAPER}.pem", Path(it.dir) / f"{SCRAPER}.key"
    if cert.exists() and key.exists() and not rotate:
        return False
    ca_key, ca_cert = credentials._dev_ca(config)  # noqa: SLF001  (the same CA as issue_inner_tls)
    new_key, new_cert = credentials._issue(  # noqa: SLF001
        ca_key, ca_cert, it.san(SCRAPER), [it.san(SCRAPER)], [ExtendedKeyUsageOID.CLIENT_AUTH])
    credentials._write_private(key, new_key.private_bytes(  # noqa: SLF001
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    credentials._write_private(cert, new_cert.public_bytes(serialization.Encoding.PEM))  # noqa: SLF001
    return True


def hand_out(config: GatewayConfig, out: Path, *, uid: int = SERVICE_UID,
             envoy_uid: int = ENVOY_UID) -> list[str]:
    """Copy each identity's pair and the CA into ``out/<identity>/`` (key first); the folders
    must exist (the mounted volumes). Returns the identities whose files changed."""
    changed = []
    ca = Path(config.inner_tls.ca_file).read_bytes()
    owners = {identity: envoy_uid if identity == inner_tls.ENVOY else uid
              for identity in credentials.inner_identities(config)}
    owners[SCRAPER] = PROMETHEUS_UID
    for identity, owner in owners.items():
        folder = out / identity
        if not folder.is_dir():
            raise StackError(f"{folder} is not mounted (docker-compose.yml, pki-init: one volume "
                             f"per inner identity)")
        files = (inner_tls.TlsFiles(str(Path(config.inner_tls.dir) / f"{SCRAPER}.pem"),
                                    str(Path(config.inner_tls.dir) / f"{SCRAPER}.key"),
                                    config.inner_tls.ca_file)
                 if identity == SCRAPER else config.inner_tls.files(identity))
        wrote = [_install(Path(files.key_file).read_bytes(), folder / "tls.key", 0o600, owner),
                 _install(Path(files.cert_file).read_bytes(), folder / "tls.crt", 0o644, owner),
                 _install(ca, folder / "ca.crt", 0o644, owner)]
        if os.geteuid() == 0:
            os.chown(folder, owner, owner)
        os.chmod(folder, 0o700)
        if any(wrote):
            changed.append(identity)
    return changed


EDGE_FILES = (("server.key", 0o600), ("server.pem", 0o644))  # key first, as in hand_out


def hand_out_edge(src: Path, out: Path, *, envoy_uid: int = ENVOY_UID) -> bool:
    """Copy the edge pair from ``src`` into ``out`` (a mounted volume) for Envoy's user; True
    when a file changed. A missing file is an error naming it (Envoy cannot start without it)."""
    if not out.is_dir():
        raise StackError(f"{out} is not mounted (docker-compose.yml, pki-init: the edge-tls volume)")
    changed = False
    for name, mode in EDGE_FILES:
        source = src / name
        if not source.is_file():
            raise StackError(f"{source}: the edge certificate's {name} is missing (MCP_GATEWAY_TLS_DIR: "
                             f"run `mcp-gateway up` once, or put the organisation's pair there)")
        changed = _install(source.read_bytes(), out / name, mode, envoy_uid) or changed
    if os.geteuid() == 0:
        os.chown(out, envoy_uid, envoy_uid)
    os.chmod(out, 0o700)
    return changed


def ensure_assertion_key(config: GatewayConfig, *, uid: int = SERVICE_UID) -> bool:
    """identity.keys made when missing (True), then both files and their folders (which must be
    mounted) given to ``uid``: the key file and its folder private, the JWKS readable by all."""
    identity = config.identity
    keys, jwks = Path(identity.keys), Path(identity.jwks_file)
    for path, key in ((keys, "identity.keys"), (jwks, "identity.jwks_file")):
        if not path.parent.is_dir():
            raise StackError(f"{path.parent} ({key}) is not mounted (docker-compose.yml, pki-init)")
    made = not keys.exists()
    if made:
        assertion_keys.init(identity)
    for path, mode, folder_mode in ((keys, 0o600, 0o700), (jwks, 0o644, 0o755)):
        if os.geteuid() == 0:
            os.chown(path.parent, uid, uid)
            os.chown(path, uid, uid)
        os.chmod(path.parent, folder_mode)
        os.chmod(path, mode)
    return made


def ensure_audit_master_key(config: GatewayConfig, *, uid: int = SERVICE_UID) -> Path | None:
    """audit.master_key's key file (the file ``<name>_FILE`` names in this environment, on a volume
    the audit writers mount read-only) made when missing, 0600 in a 0700 folder owned by ``uid``;
    the path when made. Nothing to do without audit.master_key, without ``<name>_FILE``, or when
    the variable itself holds the key (the operator's)."""
    name = config.audit.master_key
    if name is None or os.environ.get(name) or not os.environ.get(f"{name}_FILE"):
        return None
    path = Path(os.environ[f"{name}_FILE"])
    if not path.parent.is_dir():
        raise StackError(f"{path.parent} ({name}_FILE, audit.master_key) is not mounted "
                         f"(docker-compose.yml, pki-init: the audit-keys volume)")
    made = not path.exists()
    if made:  # never replaced: entries sealed under keys it wraps would become unreadable
        _install(f"{new_master_key()}\n".encode(), path, 0o600, uid)
    if os.geteuid() == 0:
        os.chown(path.parent, uid, uid)
        os.chown(path, uid, uid)
    os.chmod(path.parent, 0o700)
    os.chmod(path, 0o600)
    return path if made else None


def ensure_audit_signing_key(config: GatewayConfig, *, uid: int = SERVICE_UID) -> bool:
    """audit.signing_key (Ed25519, signing every audit writer's checkpoints) made when missing
    (True), 0600 in a 0700 folder owned by ``uid`` (the audit-keys volume the writers mount
    read-only); never replaced (verify would see a new key mid-chain)."""
    if config.audit.signing_key is None:
        return False
    path = Path(config.audit.signing_key)
    if not path.parent.is_dir():
        raise StackError(f"{path.parent} (audit.signing_key) is not mounted "
                         f"(docker-compose.yml, pki-init: the audit-keys volume)")
    made = not path.exists()
    if made:
        generate_signing_key(path)
    if os.geteuid() == 0:
        os.chown(path.parent, uid, uid)
        os.chown(path, uid, uid)
    os.chmod(path.parent, 0o700)
    os.chmod(path, 0o600)
    return made


def ensure_delegation_key(key: Path, jwks: Path, *, uid: int = SERVICE_UID) -> bool:
    """The workflow server's delegation key made when missing (True; never replaced: the tokens
    of runs in progress are signed with it), 0600 in a 0700 folder owned by ``uid``, and its
    public JWKS written (0644 in a 0755 folder) from whatever key the file holds. Both folders
    must be mounted volumes."""
    for path, flag in ((key, "--delegation-key"), (jwks, "--delegation-jwks")):
        if not path.parent.is_dir():
            raise StackError(f"{path.parent} ({flag}) is not mounted (docker-compose.yml, pki-init)")
    made = not key.exists()
    try:
        ring = load_or_create_key(key)
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{key} (--delegation-key) is not a delegation key file: {exc}") from None
    publish_jwks(ring, jwks)
    for path, mode, folder_mode in ((key, 0o600, 0o700), (jwks, 0o644, 0o755)):
        if os.geteuid() == 0:
            os.chown(path.parent, uid, uid)
            os.chown(path, uid, uid)
        os.chmod(path.parent, folder_mode)
        os.chmod(path, mode)
    return made


EDGE_CA = "ca.pem"


def hand_out_edge_ca(src: Path, out: Path, *, uid: int = SERVICE_UID) -> bool:
    """Copy the edge CA certificate (``src/ca.pem``) into ``out`` (a mounted volume), 0644; True
    when it changed. Missing, it is an error naming it: the workflow server would trust nothing."""
    if not out.is_dir():
        raise StackError(f"{out} is not mounted (docker-compose.yml, pki-init: the edge-ca volume)")
    source = src / EDGE_CA
    if not source.is_file():
        raise StackError(f"{source}: the edge certificate's CA is missing (MCP_GATEWAY_TLS_DIR: "
                         f"`mcp-gateway up` makes it; with the organisation's pair, put the "
                         f"certificate of the CA that issued server.pem there)")
    changed = _install(source.read_bytes(), out / EDGE_CA, 0o644, uid)
    if os.geteuid() == 0:
        os.chown(out, uid, uid)
    os.chmod(out, 0o755)  # noqa: S103  (a public certificate, read by another user)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatewayctl.compose_init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the compose gateway config")
    parser.add_argument("--pki", required=True, type=Path,
                        help="the CA and the issued pairs (mounted by this service only)")
    parser.add_argument("--out", required=True, type=Path,
                        help="one mounted folder per inner identity: <out>/<identity>/")
    parser.add_argument("--rotate", action="store_true", help="reissue every pair")
    parser.add_argument("--uid", type=int, default=SERVICE_UID, help="owner of the Python services' files")
    parser.add_argument("--envoy-uid", type=int, default=ENVOY_UID, help="owner of Envoy's files")
    parser.add_argument("--edge-src", type=Path, help="the edge pair (server.pem, server.key)")
    parser.add_argument("--edge-out", type=Path, help="Envoy's edge TLS volume")
    parser.add_argument("--edge-ca-out", type=Path,
                        help="where the edge CA (--edge-src's ca.pem) is copied for the workflow server")
    parser.add_argument("--delegation-key", type=Path,
                        help="the workflow server's delegation key file (made once, never replaced)")
    parser.add_argument("--delegation-jwks", type=Path,
                        help="where that key's public JWKS is written (served to ext_authz)")
    args = parser.parse_args(argv)
    if (args.edge_src is None) != (args.edge_out is None):
        parser.error("--edge-src and --edge-out go together")
    if args.edge_ca_out is not None and args.edge_src is None:
        parser.error("--edge-ca-out needs --edge-src")
    if (args.delegation_key is None) != (args.delegation_jwks is None):
        parser.error("--delegation-key and --delegation-jwks go together")
    try:
        config = load_config(args.config)
        if args.edge_src is not None and hand_out_edge(args.edge_src, args.edge_out,
                                                       envoy_uid=args.envoy_uid):
            print(f"edge TLS: copied {args.edge_src} for Envoy")
        if args.edge_ca_out is not None and hand_out_edge_ca(args.edge_src, args.edge_ca_out,
                                                             uid=args.uid):
            print(f"edge CA: copied {args.edge_src / EDGE_CA} for the workflow server")
        if args.delegation_key is not None and ensure_delegation_key(
                args.delegation_key, args.delegation_jwks, uid=args.uid):
            print(f"workflow delegation key: made {args.delegation_key} and {args.delegation_jwks}")
        if config.identity.assertion and ensure_assertion_key(config, uid=args.uid):
            print(f"caller assertion: made {config.identity.keys} and {config.identity.jwks_file}")
        if ensure_audit_signing_key(config, uid=args.uid):
            print(f"audit.signing_key: made {config.audit.signing_key}")
        master = ensure_audit_master_key(config, uid=args.uid)
        if master is not None:
            print(f"audit.master_key: made {master} (back it up: sealed audit fields need it)")
        if not config.inner_tls.enabled:
            print("inner_tls is off in the config: nothing to issue", file=sys.stderr)
            return 0
        issuing = pki_config(config, args.pki)
        issued = credentials.issue_inner_tls(issuing, only_missing=not args.rotate)
        if issue_scraper(issuing, rotate=args.rotate):
            issued.append(SCRAPER)
        changed = hand_out(issuing, args.out, uid=args.uid, envoy_uid=args.envoy_uid)
    except (ConfigError, StackError, assertion_keys.KeysError, OSError) as exc:
        print(f"compose_init: {exc}", file=sys.stderr)
        return 1
    print(f"inner TLS: issued {', '.join(issued) or 'nothing'}; "
          f"updated {', '.join(changed) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
