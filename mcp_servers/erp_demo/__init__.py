"""A small but real ERP backend (aiohttp + SQLite) for the integration layer's demos and tests."""

from mcp_servers.erp_demo.app import ErpSettings, make_app

__all__ = ["ErpSettings", "make_app"]
