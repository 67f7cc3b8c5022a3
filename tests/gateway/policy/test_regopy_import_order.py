"""The services' entry points load regopy before other C++ extensions (no per-decision leak)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Imports an entry module the way `python -m <service>` does, then evaluates the shipped policy
# many times and prints how much the resident set grew (MB).
PROBE = """
import importlib, sys
for name in sys.argv[2].split(","):
    if name:
        importlib.import_module(name)
import {module}
from pathlib import Path
from gateway.policy.rego import CompiledPolicy, load_sources

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

policy = CompiledPolicy(load_sources(Path(sys.argv[1]), include_tests=False), ["mcp/authz/decision"])
doc = {{"mcp": {{"method": "tools/call", "tool": "read_file", "arguments": {{"path": "a"}}}},
       "token": {{"roles": ["engineer"], "tenant": "acme", "scope": ""}},
       "server": {{"name": "files"}}, "attributes": {{"request": {{"http": {{"method": "POST"}}}}}}}}
for _ in range(200):
    policy.evaluate("mcp/authz/decision", doc)
before = rss_kb()
for _ in range(3000):
    policy.evaluate("mcp/authz/decision", doc)
print((rss_kb() - before) / 1024)
"""


def rss_growth_mb(module: str, preload: str = "") -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module),
                          str(ROOT / "policies"), preload],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("module", ["ext_authz.__main__", "ext_proc.__main__"])
def test_policy_evaluations_do_not_grow_memory_after_entry_point_import(module: str) -> None:
    """Importing a service's entry module first keeps 3000 Rego evaluations from leaking."""
    assert rss_growth_mb(module) < 15


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("module", "preload"), [("ext_authz.__main__", "grpc"),
                                                 ("ext_proc.__main__", "aiohttp")])
def test_probe_detects_the_leak_when_another_extension_loads_first(module: str, preload: str) -> None:
    """The probe is sensitive: with grpc or aiohttp loaded before regopy the evaluations leak."""
    assert rss_growth_mb(module, preload=preload) >= 15
