"""The local dev stack: every gateway process on one machine, supervised.

``mcp-gateway up`` starts, in order: the auxiliary backends (``backends``: e.g. the demo ERP that
the integration server reads its OpenAPI document from at start-up); then, in parallel, a JWKS
server for the dev signing key, the ext_authz processes, ext_proc (when installed) and two or
more instances of each MCP server; and Envoy last (its health checks need the upstreams). It
waits until each one answers its health check, then prints endpoints, a token, client snippets,
and where traces, metrics and audit files are.

One module per concern: ``state`` (the files under ``state_dir``), ``credentials`` (dev CA and
certificates, signing key and JWKS, tokens, dev secrets), ``plan`` (which processes, with which
arguments, environment and ports), ``health`` (one health check), ``supervisor`` (start, wait
until healthy, stop; ``status`` and ``down``) and ``banner`` (what ``up`` prints). Callers use
the names exported here.
"""

from gatewayctl.devstack.banner import banner, observability_lines, serves_metrics
from gatewayctl.devstack.credentials import (
    DEV_TOKEN_ROLES,
    DEV_TOKEN_SUB,
    DEV_TOKEN_TENANT,
    DEV_TOKEN_TTL,
    dev_token,
    ensure_secrets,
    ensure_tls,
    mint,
    signing_key,
)
from gatewayctl.devstack.health import probe
from gatewayctl.devstack.plan import (
    Component,
    Probe,
    base_dir,
    check_ports,
    config_arguments,
    listening_ports,
    plan,
)
from gatewayctl.devstack.state import Paths, StackError, paths
from gatewayctl.devstack.supervisor import (
    STARTUP_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    Stack,
    down,
    read_pid_file,
    reload,
    restart,
    running,
    running_envoy_digest,
    status,
)

__all__ = [
    "DEV_TOKEN_ROLES",
    "DEV_TOKEN_SUB",
    "DEV_TOKEN_TENANT",
    "DEV_TOKEN_TTL",
    "STARTUP_TIMEOUT_SECONDS",
    "STOP_TIMEOUT_SECONDS",
    "Component",
    "Paths",
    "Probe",
    "Stack",
    "StackError",
    "banner",
    "base_dir",
    "check_ports",
    "config_arguments",
    "dev_token",
    "down",
    "ensure_secrets",
    "ensure_tls",
    "listening_ports",
    "mint",
    "observability_lines",
    "paths",
    "plan",
    "probe",
    "read_pid_file",
    "reload",
    "restart",
    "running",
    "running_envoy_digest",
    "serves_metrics",
    "signing_key",
    "status",
]
