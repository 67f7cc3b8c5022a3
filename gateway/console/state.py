"""The console's shared state, one object per process (``CONSOLE`` in the app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ext_authz.jwt import TokenVerifier
from gateway.catalog import Catalog
from gateway.console.auth import ConsolePolicy, SessionStore
from gateway.console.envoy_stats import EnvoyAdmin, TrafficSampler
from gateway.console.matrix import Matrix
from gateway.console.oidc import OidcClient
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
    # The newest matrix, the (policy version, catalog tools) it was computed for, and the one
    # computation that may run in the background (views.refresh_matrix).
    matrix: Matrix | None = None
    matrix_key: tuple[int, Any] | None = None
    matrix_task: asyncio.Task[None] | None = None
    matrix_error: str | None = None


CONSOLE = web.AppKey("console", ConsoleState)
