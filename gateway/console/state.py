"""The console's shared state, one object per process (``CONSOLE`` in the app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ext_authz.jwt import TokenVerifier
from gateway.catalog import Catalog
from gateway.console.auth import ConsolePolicy, SessionStore
from gateway.console.envoy_stats import EnvoyAdmin, TrafficSampler
from gateway.console.matrix import Matrix
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
    # (policy version, catalog signature) -> matrix; one computation at a time.
    matrix_cache: dict[tuple[int, Any], Matrix] = field(default_factory=dict)
    matrix_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


CONSOLE = web.AppKey("console", ConsoleState)
