"""Shared by the dev stack tests: a gateway config on free loopback ports in a temp folder."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ; the OS may still hand one
    out again before the stack binds it, which the stack reports as a clear port error)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def stack_config(tmp: Path, *, servers: dict[str, dict[str, Any]] | None = None,
                 instances: int = 2, ext_authz: int = 2) -> Path:
    """Write a gateway config whose every port is free and whose state lives in ``tmp``.

    ``servers`` maps name -> {"module": ..., "args": [...]}; default: one stand-in server "echo".
    """
    servers = servers or {"echo": {"module": "tests.e2e.standin_upstream"}}
    ports = iter(free_ports(4 + ext_authz * 2 + instances * len(servers)))
    listen = next(ports)
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": listen},
        "public_url": f"https://127.0.0.1:{listen}",
        "admin": {"host": "127.0.0.1", "port": next(ports)},
        "state_dir": str(tmp / "state"),
        "tls": {"cert_file": str(tmp / "state/tls/server.pem"),
                "key_file": str(tmp / "state/tls/server.key")},
        "issuers": [{"issuer": "https://dev-issuer.mcp-gateway.local",
                     "jwks_url": f"http://127.0.0.1:{next(ports)}/jwks.json"}],
        "policy": {"engine": "embedded", "dir": str(REPO / "policies")},
        "ext_authz": {"instances": [{"port": next(ports)} for _ in range(ext_authz)]},
        "ext_proc": {"instances": [{"port": next(ports)} for _ in range(ext_authz)]},
        "servers": {name: {**spec, "instances": [{"port": next(ports)} for _ in range(instances)]}
                    for name, spec in servers.items()},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path
