"""The console's shared state, one object per process (``CONSOLE`` in the app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ext_authz.jwt import TokenVerifier
from gateway.catalog import Catalog
from gateway.console.activity import ConsoleActivity
from gateway.console.auth import ConsolePolicy, SessionStore
from gateway.console.envoy_stats import EnvoyAdmin, TrafficSampler
from gateway.console.matrix import TenantMatrices
from gateway.console.oidc import OidcClient
from gateway.console.service_metrics import ServiceMetrics
from gateway.console.settings import ConsoleSettings
from gateway.telemetry.audit_keys import SubjectKeyStore


@dataclass(slots=True)
class ConsoleState:
    settings: ConsoleSettings
    verifier: TokenVerifier
    policy: ConsolePolicy
    sessions: SessionStore
    catalog: Catalog
    admin: EnvoyAdmin
    sampler: TrafficSampler
    key_store: SubjectKeyStore | None
    public_origin: str
    oidc: OidcClient | None = None
    # The services' own /metrics, scraped in the background (None: not scraped, as in tests of
    # other pages).
    services: ServiceMetrics | None = None
    # Records audit searches and exports in the trail; None when the console's chain could not
    # be opened (searches and exports are then refused).
    activity: ConsoleActivity | None = None
    # Held by the one export that may run at a time.
    export_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The newest matrix, the (policy version, catalog tools) it was computed for, and the one
    # computation that may run in the background (views.refresh_matrix).
    matrix: TenantMatrices | None = None
    matrix_key: tuple[int, Any] | None = None
    matrix_task: asyncio.Task[None] | None = None
    matrix_error: str | None = None


CONSOLE = web.AppKey("console", ConsoleState)
