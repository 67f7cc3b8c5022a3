"""One dev stack for the whole e2e session: the real Envoy, ext_authz, ext_proc (when installed),
the files, database, ERP (integration server + demo ERP backend) and test MCP servers, and the
conformance server once it exists. Free ports, a temp state dir, and a copy of the example policy
extended with the test-only "pii" server."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gatewayctl import devstack
from tests.e2e.helpers import REPO, authz_transport, stack_config
from tests.ports import free_ports

ERP_OPERATIONS = ("listCustomers", "getCustomer", "listOrders", "getOrder", "createOrder",
                  "cancelOrder", "listInvoices", "getInvoice", "salesReport")
REQUIRED = ("ext_authz.__main__", "mcp_servers.files.__main__", "mcp_servers.database.__main__",
            "mcp_servers.integration.__main__", "mcp_servers.erp_demo.__main__")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_EXT_PROC = installed("ext_proc.__main__")
HAS_CONFORMANCE = installed("mcp_servers.conformance.__main__")


def test_policy(target: Path) -> Path:
    """The example policy with grants for the test-only "pii" server (and for "erp" when the
    example policy does not grant it yet: see the report of issue 8)."""
    shutil.copytree(REPO / "policies", target)
    data_file = target / "data.json"
    data: dict[str, Any] = json.loads(data_file.read_text())
    gw = data["gateway"]
    gw["servers"]["pii"] = {"tenants": ["*"]}
    gw["roles"]["admin"]["tools"]["pii"] = ["*"]
    gw["roles"]["viewer"]["tools"]["pii"] = ["contact"]
    if "erp" not in gw["servers"]:
        gw["servers"]["erp"] = {"tenants": ["*"]}
        gw["roles"]["admin"]["tools"]["erp"] = ["*"]
        gw["roles"]["analyst"]["tools"]["erp"] = ["list*", "get*", "salesReport"]
    data_file.write_text(json.dumps(data, indent=2))
    return target


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Stack]:
    missing = [m for m in REQUIRED if not installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "files-root").mkdir()
    (erp_port,) = free_ports(1)
    erp_url = f"http://127.0.0.1:{erp_port}"
    allow = [arg for op in ERP_OPERATIONS for arg in ("--allow", op)]
    servers: dict[str, dict[str, Any]] = {
        "files": {"module": "mcp_servers.files", "args": ["--root", str(tmp / "files-root"),
                                                          "--seed-demo"]},
        "database": {"module": "mcp_servers.database", "args": ["--seed-demo"], "count": 1},
        "pii": {"module": "tests.e2e.pii_server", "count": 1},
        "erp": {"module": "mcp_servers.integration", "count": 1, "env": ["ERP_API_KEY"],
                "args": ["--name", "erp", "--openapi", f"{erp_url}/openapi.json",
                         "--base-url", erp_url, "--api-key-env", "ERP_API_KEY", *allow]},
    }
    if HAS_CONFORMANCE:
        servers["conformance"] = {"module": "mcp_servers.conformance", "count": 1}
    extra = {
        "secrets": ["ERP_API_KEY"],
        "backends": {"erp_demo": {"module": "mcp_servers.erp_demo", "instance": {"port": erp_port},
                                  "env": ["ERP_API_KEY"],
                                  "args": ["--db", str(tmp / "erp.sqlite3"), "--debug"]}},
        "policy": {"engine": "embedded", "dir": str(test_policy(tmp / "policies"))},
    }
    config = load_config(stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                                      authz_transport=authz_transport()))
    with pytest.MonkeyPatch.context() as mp:
        # The test MCP server lives in tests/, which is not an installed package.
        mp.setenv("PYTHONPATH", str(REPO))
        with devstack.running(config, ext_proc=HAS_EXT_PROC) as running:
            yield running
