"""The aiohttp application around a :class:`MCPServer`, and the process entry point (HTTP, or
``--stdio``: :mod:`mcp_servers.core.stdio`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from gateway import eventloop, inner_tls
from gateway.inner_peers import guard_app
from gateway.signals import stop_event
from gateway.telemetry.audit import AuditWriter, OtlpAuditExporter
from gateway.telemetry.audit_chain import CheckpointSigner
from gateway.telemetry.audit_keys import SubjectKeyStore, master_key_from_env
from gateway.telemetry.metrics import add_metrics_route
from gateway.telemetry.tracing import setup_tracing, shutdown_tracing
from mcp_servers.core.identity import add_assertion_arguments, identity_context
from mcp_servers.core.logs import configure_logging
from mcp_servers.core.server import Lifespan, MCPServer
from mcp_servers.core.settings import ServerSettings
from mcp_servers.core.stdio import claim_stdout, serve_stdio
from mcp_servers.core.transport import Transport

logger = logging.getLogger(__name__)

TRANSPORT_KEY = web.AppKey("mcp_transport", Transport)
SETTINGS_KEY = web.AppKey("mcp_settings", ServerSettings)


def _app_lifespan(fn: Lifespan) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        async with contextlib.asynccontextmanager(fn)():
            yield
    return ctx


def make_app(server: MCPServer, settings: ServerSettings | None = None) -> web.Application:
    """An application serving ``server`` on ``settings.path`` plus ``/health``, ``/ready``, ``/metrics``.

    Start-up order: audit trail, the server's lifespans, then requests; clean-up runs the other way
    round once in-flight requests finished (sessions and streams closed first, the audit file last).
    """
    settings = settings or ServerSettings()
    transport = Transport(server, settings)
    app = web.Application(handler_args={"max_field_size": 16384})
    app[TRANSPORT_KEY] = transport
    app[SETTINGS_KEY] = settings

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "server": server.name})

    async def ready(_request: web.Request) -> web.Response:
        if transport.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)

    async def on_shutdown(_app: web.Application) -> None:
        await transport.begin_shutdown()

    async def transport_ctx(_app: web.Application) -> AsyncIterator[None]:
        yield
        await transport.close()

    if settings.audit_file is not None:
        async def audit_ctx(_app: web.Application) -> AsyncIterator[None]:
            async with audit_trail(server, settings) as writer:
                assert writer is not None
                async for _ in transport.recorder.run_audit(writer):
                    yield

        app.cleanup_ctx.append(audit_ctx)
    for lifespan in server.lifespans:
        app.cleanup_ctx.append(_app_lifespan(lifespan))
    app.cleanup_ctx.append(transport_ctx)
    if settings.assertion_jwks is not None:
        # Behind the gateway: the caller comes from its signed assertion only.
        assert settings.assertion_issuer is not None and settings.assertion_audience is not None
        app.cleanup_ctx.append(identity_context(
            transport.identity, settings.assertion_jwks, issuer=settings.assertion_issuer,
            audience=settings.assertion_audience, leeway=settings.assertion_leeway))
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    add_metrics_route(app)
    app.router.add_route("*", settings.path, transport.handle)
    app.on_shutdown.append(on_shutdown)
    return app


@contextlib.asynccontextmanager
async def audit_trail(server: MCPServer, settings: ServerSettings) -> AsyncIterator[AuditWriter | None]:
    """The audit trail ``settings`` ask for (None: no server-side audit), not started yet (the
    recorder's lifespan opens and closes it), signing and sealing like ext_authz's; the subject
    key store it seals with closes after it."""
    if settings.audit_file is None:
        yield None
        return
    # A configured checkpoint key that cannot be loaded fails start-up (ValueError names the key).
    signer = CheckpointSigner.from_file(settings.audit_signing_key) if settings.audit_signing_key else None
    keys = None
    if settings.audit_master_key is not None:
        # The store beside the file: in the dev stack that is audit.dir, shared with ext_authz and
        # the one `mcp-gateway audit erase` destroys keys in. Opening may wait on its write lock.
        keys = await asyncio.to_thread(SubjectKeyStore, Path(settings.audit_file).parent,
                                       settings.audit_master_key)
    try:
        exporter = None
        if settings.audit_otlp_export and settings.otlp_endpoint:
            exporter = OtlpAuditExporter(settings.otlp_endpoint, server.name)
        yield AuditWriter(settings.audit_file, max_bytes=settings.audit_max_bytes, keep=settings.audit_keep,
                          timeout=settings.audit_timeout, exporter=exporter, signer=signer,
                          checkpoint_seconds=settings.audit_checkpoint_seconds, keys=keys,
                          retention_days=settings.audit_retention_days, sync=settings.audit_sync,
                          sync_interval=settings.audit_sync_interval)
    finally:
        if keys is not None:
            keys.close()


def transport_of(app: web.Application) -> Transport:
    return app[TRANSPORT_KEY]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    parser.add_argument("--stdio", action="store_true",
                        help="serve one client on stdin/stdout (newline-delimited JSON-RPC) instead of "
                             "HTTP; logs stay on stderr, EOF on stdin ends the process")
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--path", default=defaults.path, help="MCP endpoint path (default %(default)s)")
    parser.add_argument("--allowed-origins", default="",
                        help="comma-separated exact origins allowed besides the allowed hosts")
    parser.add_argument("--allowed-hosts", default=",".join(defaults.allowed_hosts),
                        help="comma-separated Host names accepted ('*' disables the check)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout)
    parser.add_argument("--log-level", default=defaults.log_level)
    parser.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                        help="OTLP/gRPC collector for traces (default $OTEL_EXPORTER_OTLP_ENDPOINT; "
                             "none: no export)")
    parser.add_argument("--audit-file", default=None, metavar="PATH",
                        help="append an audit entry per tools/call, resources/read and prompts/get "
                             "result to this JSON-lines file before answering (one process per file)")
    parser.add_argument("--audit-max-bytes", type=int, default=defaults.audit_max_bytes,
                        help="rotate the audit file at this size")
    parser.add_argument("--audit-keep", type=int, default=defaults.audit_keep,
                        help="rotated audit files to keep")
    parser.add_argument("--audit-otlp-export", action="store_true",
                        help="also ship audit entries as OTLP logs to --otlp-endpoint")
    parser.add_argument("--audit-signing-key", default=None, metavar="FILE",
                        help="Ed25519 private key (PEM) signing the audit chain's checkpoints "
                             "(audit.signing_key; default: unsigned)")
    parser.add_argument("--audit-checkpoint-seconds", type=float, default=defaults.audit_checkpoint_seconds,
                        help="write a checkpoint of the audit chain at least this often")
    parser.add_argument("--audit-master-key-env", default=None, metavar="NAME",
                        help="environment variable holding the audit master key (audit.master_key: "
                             "base64url, 32 bytes): personal fields are sealed per subject, keys in "
                             "subject-keys.sqlite beside the audit file (default: in clear)")
    parser.add_argument("--audit-retention-days", type=float, default=None,
                        help="remove rotated audit files older than this (audit.retention_days)")
    parser.add_argument("--audit-sync", choices=("batch", "interval"), default=defaults.audit_sync,
                        help="batch: fsync each result entry before the answer; interval: write it "
                             "before the answer (kept through a SIGKILL), fsync within "
                             "--audit-sync-interval-ms (audit.result_sync; default: batch)")
    parser.add_argument("--audit-sync-interval-ms", type=int,
                        default=round(defaults.audit_sync_interval * 1000),
                        help="interval mode: fsync at most this long after a write (default 100)")
    add_assertion_arguments(parser)



def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    def split(value: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    master = None
    if args.audit_master_key_env:
        # Read here, once: a missing or malformed key fails start-up naming the variable.
        name = args.audit_master_key_env
        master = master_key_from_env(name)
        if master is None:
            raise ValueError(f"audit.master_key: the secret {name} (--audit-master-key-env) is not set "
                             f"in this process's environment (nor {name}_FILE)")
    return ServerSettings(host=args.host, port=args.port, path=args.path,
                          allowed_origins=split(args.allowed_origins),
                          allowed_hosts=split(args.allowed_hosts), max_body_bytes=args.max_body_bytes,
                          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                          otlp_endpoint=args.otlp_endpoint or None, audit_file=args.audit_file,
                          audit_max_bytes=args.audit_max_bytes, audit_keep=args.audit_keep,
                          audit_otlp_export=args.audit_otlp_export,
                          audit_signing_key=args.audit_signing_key,
                          audit_checkpoint_seconds=args.audit_checkpoint_seconds,
                          audit_master_key=master, audit_retention_days=args.audit_retention_days,
                          audit_sync=args.audit_sync,
                          audit_sync_interval=args.audit_sync_interval_ms / 1000,
                          assertion_jwks=args.assertion_jwks, assertion_issuer=args.assertion_issuer,
                          assertion_audience=args.assertion_audience)


async def run_server(server: MCPServer, settings: ServerSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain: not ready, finish in-flight calls, close."""
    app = make_app(server, settings)
    # inner_tls: TLS only, reloaded on change; callers: Envoy, and ext_authz's catalog fetch
    # (Prometheus's certificate on GET /metrics only).
    tls = inner_tls.server_tls_from_env(callers=inner_tls.SERVER_CALLERS, scraper=True)
    guard_app(app, tls, server.name)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port,
                       ssl_context=tls.context if tls is not None else None)
    await site.start()
    port = settings.port
    if runner.addresses:
        port = runner.addresses[0][1]
    logger.info("listening", extra={"server": server.name, "host": settings.host, "port": port,
                                    "path": settings.path})
    try:
        async with inner_tls.watching(tls):
            await stop.wait()
        logger.info("shutting down", extra={"server": server.name})
        await app[TRANSPORT_KEY].begin_shutdown()
        if settings.drain_seconds > 0:
            # Give the load balancer time to see /ready fail before the listener closes.
            await asyncio.sleep(settings.drain_seconds)
    finally:
        await runner.cleanup()
    logger.info("stopped", extra={"server": server.name})


def serve_main(build: Callable[[argparse.Namespace], MCPServer],
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the server, serve until SIGINT/SIGTERM with a graceful shutdown."""
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    # Over stdio, stdout is the protocol: claimed before anything (build() included) can print.
    protocol_out = claim_stdout() if args.stdio else None
    # Logging first, so what build() logs (seeding, backend choice) is not lost; the service name is
    # refined once the server knows its own.
    configure_logging(_service_name(build), settings.log_level)
    server = build(args)
    configure_logging(server.name, settings.log_level)
    setup_tracing(server.name, settings.otlp_endpoint)

    async def main() -> None:
        if protocol_out is not None:
            async with audit_trail(server, settings) as audit:
                await serve_stdio(server, settings, stop_event(), protocol_out, audit)
        else:
            await run_server(server, settings, stop_event())

    try:
        eventloop.run(main())
    except Exception:  # noqa: BLE001 - the process's top-level handler: one JSON line, exit 1.
        logger.exception("server %s failed", server.name)
        raise SystemExit(1) from None
    finally:
        shutdown_tracing()


def _service_name(build: Callable[..., object]) -> str:
    """``files`` for ``mcp_servers.files.server.build_server``: a name for lines logged by build()."""
    parts = [p for p in build.__module__.split(".") if p not in ("mcp_servers", "server", "__main__")]
    return parts[0] if parts else "mcp_server"
