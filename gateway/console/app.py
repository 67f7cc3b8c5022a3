"""Wiring and lifecycle of the console process: ``make_app`` builds the aiohttp application
(its resources opened and closed by one ``cleanup_ctx``), ``run`` serves it until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web

from ext_authz.jwt import TokenVerifier
from gateway import inner_tls
from gateway.catalog import Catalog
from gateway.console import activity as activity_mod
from gateway.console import views
from gateway.console.activity import ConsoleActivity
from gateway.console.auth import ConsolePolicy, PolicyUnavailable, SessionStore
from gateway.console.envoy_stats import EnvoyAdmin, EnvoyStatsListener, TrafficSampler
from gateway.console.oidc import OidcClient
from gateway.console.service_metrics import ClientTls, ServiceMetrics
from gateway.console.settings import (
    ENVOY_TIMEOUT_SECONDS,
    MAX_SESSIONS,
    SAMPLE_SECONDS,
    SAMPLES_KEPT,
    ConsoleSettings,
)
from gateway.console.state import CONSOLE, ConsoleState
from gateway.console.web import MAX_FORM_BYTES, origin_of, security_headers
from gateway.inner_peers import guard_app
from gateway.jwks import JwksClient
from gateway.signals import stop_event
from gateway.telemetry.audit import AuditUnavailable, AuditWriter
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyStore, parse_master_key

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def open_key_store(settings: ConsoleSettings) -> SubjectKeyStore | None:
    """The audit key store, to open sealed personal fields; None without a master key (rows
    then show their subject as sealed)."""
    name = settings.audit_master_key
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        try:
            value = (settings.secrets_dir / name).read_text(encoding="utf-8").strip()
        except OSError:
            logger.warning("audit.master_key %s is not available: sealed audit fields stay closed", name)
            return None
    try:
        return SubjectKeyStore(settings.audit_dir, parse_master_key(value, f"audit.master_key ({name})"))
    except (KeyStoreError, OSError) as exc:
        logger.warning("audit key store not opened: %s", exc)
        return None


async def _keep_matrix_fresh(st: ConsoleState) -> None:
    """Recompute the who-may-call-what matrix soon after the policy or the catalog changes."""
    while True:
        await views.refresh_matrix(st)
        await asyncio.sleep(SAMPLE_SECONDS)


def make_app(settings: ConsoleSettings) -> web.Application:
    app = web.Application(middlewares=[security_headers, views.require_session],
                          client_max_size=MAX_FORM_BYTES)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                         autoescape=jinja2.select_autoescape(default=True, default_for_string=True))
    app.add_routes(views.routes())

    async def resources(app: web.Application) -> AsyncIterator[None]:
        http = aiohttp.ClientSession(headers={"accept": "application/json"})
        store = None
        catalog = None
        writer: AuditWriter | None = None
        sampler_task: asyncio.Task[None] | None = None
        warmer_task: asyncio.Task[None] | None = None
        scraper_task: asyncio.Task[None] | None = None
        try:
            jwks = {i.issuer: JwksClient(i.jwks_url, http, cooldown=settings.auth.jwks_cooldown_seconds,
                                         timeout=settings.auth.jwks_timeout_seconds,
                                         max_bytes=1024 * 1024, issuer=i.issuer)
                    for i in settings.issuers}
            verifier = TokenVerifier({i.issuer: (i, jwks[i.issuer]) for i in settings.issuers},
                                     settings.auth)
            policy = ConsolePolicy(settings.policy_dir, settings.authz_entrypoint,
                                   settings.console_entrypoint)
            with contextlib.suppress(PolicyUnavailable):  # logged; every decision refuses meanwhile
                await policy.refresh(force=True)
            catalog = await asyncio.to_thread(Catalog, settings.catalog_path)
            store = await asyncio.to_thread(open_key_store, settings)
            activity = None
            try:
                writer = activity_mod.open_writer(settings.audit_dir, signing_key=settings.audit_signing_key,
                                                  keys=store)
                await writer.start()
                activity = ConsoleActivity(writer, store)
            except (OSError, ValueError, AuditUnavailable) as exc:
                if writer is not None:
                    with contextlib.suppress(OSError, AuditUnavailable):
                        await writer.close()
                writer = None
                logger.error("the console's audit chain cannot be opened: audit searches and exports "
                             "are refused: %s", exc)
            admin = EnvoyAdmin(settings.admin_url, http, timeout=ENVOY_TIMEOUT_SECONDS)
            stats = EnvoyStatsListener(settings.envoy_stats_url, http, timeout=ENVOY_TIMEOUT_SECONDS) \
                if settings.envoy_stats_url else None
            sampler = TrafficSampler(admin, interval=SAMPLE_SECONDS, keep=SAMPLES_KEPT, stats=stats)
            # inner_tls: the console's own certificate, which the services admit on GET /metrics.
            services = ServiceMetrics(settings.metrics_targets, http, interval=SAMPLE_SECONDS,
                                      keep=SAMPLES_KEPT, client_tls=ClientTls(inner_tls.files_from_env()))
            oidc = None
            if settings.oidc is not None:
                oidc = OidcClient(settings.oidc, redirect_uri=f"{settings.resource}/oidc/callback",
                                  resource=settings.resource, http=http,
                                  client_secret=settings.oidc_client_secret)
            app[CONSOLE] = ConsoleState(
                settings=settings, verifier=verifier, policy=policy,
                sessions=SessionStore(max_sessions=MAX_SESSIONS), catalog=catalog, admin=admin,
                sampler=sampler, key_store=store, public_origin=origin_of(settings.public_url),
                oidc=oidc, activity=activity, services=services)
            sampler_task = asyncio.create_task(sampler.run())
            scraper_task = asyncio.create_task(services.run())
            warmer_task = asyncio.create_task(_keep_matrix_fresh(app[CONSOLE]))
            yield
        finally:
            for task in (sampler_task, warmer_task, scraper_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            st = app.get(CONSOLE)
            if st is not None and st.matrix_task is not None:
                st.matrix_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await st.matrix_task
            if writer is not None:
                await writer.close()
            if store is not None:
                store.close()
            if catalog is not None:
                catalog.close()
            await http.close()

    app.cleanup_ctx.append(resources)

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # Envoy's health check: not under /console, so the edge never routes it.
    app.router.add_get("/ready", ready)
    return app


async def run(settings: ConsoleSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or stop_event()
    app = make_app(settings)
    # inner_tls (MCP_INNER_TLS_* set): TLS only, Envoy's client certificate only, reloaded on change.
    tls = inner_tls.server_tls_from_env(callers=inner_tls.ENVOY_ONLY)
    guard_app(app, tls, "console")
    # No access log: the console logs its own events (sign-in, approvals, exports) by name.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port,
                       ssl_context=tls.context if tls is not None else None)
    await site.start()
    logger.info("listening", extra={"host": settings.host, "port": settings.port, "tls": tls is not None})
    try:
        async with inner_tls.watching(tls):
            await stop.wait()
    finally:
        await runner.cleanup()
    logger.info("stopped")
