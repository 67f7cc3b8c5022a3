from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from mcp_servers.erp_demo import ErpSettings, make_app

API_KEY = "erp-test-key"


@dataclass
class Erp:
    url: str
    session: aiohttp.ClientSession

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}


@pytest.fixture
async def erp(tmp_path: object) -> AsyncIterator[Erp]:
    runner = web.AppRunner(make_app(ErpSettings(api_key=API_KEY, debug=True)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        yield Erp(f"http://{host}:{port}", session)
    await runner.cleanup()
