"""What each part of Envoy's HTTP chain costs per ``tools/call`` (not a test).

    .venv/bin/python -m bench.envoy_cost [--blocks 8] [--calls 200] [--out FILE]

One dev stack with the bench config (ext_authz, ext_proc, the bench server). Beside the stack's
own Envoy, a few more Envoy processes run the stack's rendered bootstrap with one change each,
on their own listen and admin ports, in front of the same ext_authz, ext_proc and server:

* ``full``: the rendered config unchanged (the stack's Envoy);
* ``no_access_log``: without the JSON access log (and its CEL filters);
* ``no_header_mutation``, ``no_local_ratelimit``, ``no_stateful_session``: without that filter;
* ``no_ext_proc``: without the ext_proc filter (the call is not inspected: the filter's own cost
  plus the gRPC stream to ext_proc as Envoy sees it);
* ``ext_authz_and_router_only``: TLS termination, the ext_authz check and the router, nothing
  else: Envoy's floor for a checked call (the server refuses a call without the check's caller
  assertion, so the check stays).

One MCP session per Envoy, ``tools/call echo`` one call at a time, in rounds of one block per
Envoy (the order rotates); each block's CPU is read from /proc for that Envoy process only. The
figures are medians over the blocks: Envoy's CPU per call, and the difference from ``full``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import yaml

from bench.aggregate_cpu import Endpoint, _call, _open
from bench.configs import BENCH_ROLE, BENCH_TENANT, BENCH_USER, ROOT, RunContext, load_gateway_config
from bench.procs import cpu_seconds
from tests.ports import free_port

WARMUP_CALLS = 60
READY_SECONDS = 30.0


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "mcp_gateway_https")
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                return dict(f["typed_config"])
    raise ValueError("no http_connection_manager in the rendered config")


def _drop_filters(*names: str) -> Callable[[dict[str, Any]], None]:
    def change(hcm: dict[str, Any]) -> None:
        hcm["http_filters"] = [h for h in hcm["http_filters"] if h["name"] not in names]
    return change


def _no_access_log(hcm: dict[str, Any]) -> None:
    hcm.pop("access_log", None)


def _check_and_route_only(hcm: dict[str, Any]) -> None:
    keep = ("envoy.filters.http.ext_authz", "envoy.filters.http.router")
    hcm["http_filters"] = [h for h in hcm["http_filters"] if h["name"] in keep]
    hcm.pop("access_log", None)


VARIANTS: dict[str, Callable[[dict[str, Any]], None] | None] = {
    "full": None,
    "no_access_log": _no_access_log,
    "no_header_mutation": _drop_filters("envoy.filters.http.header_mutation"),
    "no_local_ratelimit": _drop_filters("envoy.filters.http.local_ratelimit"),
    "no_stateful_session": _drop_filters("envoy.filters.http.stateful_session"),
    "no_ext_proc": _drop_filters("envoy.filters.http.ext_proc"),
    "ext_authz_and_router_only": _check_and_route_only,
}


def variant_config(rendered: dict[str, Any], change: Callable[[dict[str, Any]], None],
                   port: int, admin_port: int) -> dict[str, Any]:
    """The rendered bootstrap with ``change`` applied to its HTTP connection manager, listening
    on ``port`` with its admin on ``admin_port``."""
    doc = copy.deepcopy(rendered)
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "mcp_gateway_https")
    listener["address"]["socket_address"]["port_value"] = port
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                change(f["typed_config"])
    return doc


@contextlib.contextmanager
def _envoy(config_file: Path, admin_port: int, base_id: int) -> Iterator[subprocess.Popen[bytes]]:
    from gatewayctl import envoy_config
    log = config_file.with_suffix(".log").open("wb")
    proc = subprocess.Popen(  # noqa: S603 - our binary, our file
        [str(envoy_config.find_envoy()), "-c", str(config_file), "--log-level", "warn",
         "--base-id", str(base_id), "--concurrency", str(envoy_config.worker_threads())],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:  # bounded poll of the admin's /ready
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready",  # noqa: S310
                                            timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"envoy {config_file.name} did not become ready "
                                 f"(see {config_file.with_suffix('.log')})")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def run(work: Path, blocks: int, calls: int) -> dict[str, Any]:
    from gatewayctl import devstack

    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    config = load_gateway_config(RunContext(work))
    devstack.ensure_tls(config)
    samples: dict[str, list[float]] = {label: [] for label in VARIANTS}
    with contextlib.ExitStack() as stack_ctx:
        stack = stack_ctx.enter_context(devstack.running(config, startup_timeout=90.0))
        token = devstack.mint(config, sub=BENCH_USER, roles=(BENCH_ROLE,), tenant=BENCH_TENANT,
                              ttl=3600)
        rendered = yaml.safe_load(devstack.paths(config).envoy_yaml.read_text(encoding="utf-8"))
        _hcm(rendered)  # the shape this script edits is there
        own = next(stack.procs[c.label] for c in stack.components if c.name == "envoy")
        host = f"{config.listen.host}:{config.listen.port}"
        ready: list[tuple[str, httpx2.Client, Endpoint, list[int]]] = []
        for i, (label, change) in enumerate(VARIANTS.items()):
            if change is None:
                port, pids = config.listen.port, _group(own.pid)
            else:
                port, admin = free_port(), free_port()
                path = work / f"envoy-{label}.yaml"
                path.write_text(yaml.safe_dump(variant_config(rendered, change, port, admin)),
                                encoding="utf-8")
                proc = stack_ctx.enter_context(_envoy(path, admin, base_id=port + 100_000 + i))
                pids = [proc.pid]
            http = stack_ctx.enter_context(httpx2.Client(
                verify=ssl.create_default_context(cafile=str(stack.ca_file)), timeout=30,
                headers={"host": host}))
            endpoint = Endpoint(label, f"https://{config.listen.host}:{port}/mcp/bench", "echo")
            try:
                _open(http, endpoint, token)
            except httpx2.HTTPStatusError as exc:
                raise SystemExit(f"{label}: {exc.response.status_code} {exc.response.headers} "
                                 f"{exc.response.text[:500]}") from None
            for rid in range(1, WARMUP_CALLS + 1):
                _call(http, endpoint, token, rid)
            ready.append((label, http, endpoint, pids))
        for block in range(blocks):
            shift = block % len(ready)
            for label, http, endpoint, pids in ready[shift:] + ready[:shift]:
                before = sum(cpu_seconds(p) or 0.0 for p in pids)
                for rid in range(calls):
                    _call(http, endpoint, token, 1000 + rid)
                after = sum(cpu_seconds(p) or 0.0 for p in pids)
                samples[label].append((after - before) / calls * 1e6)
    per_call = {label: round(statistics.median(v), 1) for label, v in samples.items()}
    return {"calls_per_variant": blocks * calls, "blocks": blocks, "calls_per_block": calls,
            "envoy_cpu_us_per_call": per_call,
            "saving_vs_full_us": {label: round(per_call["full"] - v, 1)
                                  for label, v in per_call.items() if label != "full"}}


def _group(pid: int) -> list[int]:
    """The stack's Envoy: every process of its restarter's group (the restarter and Envoy)."""
    from bench.procs import group_members
    return group_members(os.getpgid(pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    if ns.blocks < 1 or ns.calls < 1:
        parser.error("--blocks and --calls must be at least 1")
    with tempfile.TemporaryDirectory(prefix="envoy-cost-") as tmp:
        result = run(Path(tmp), ns.blocks, ns.calls)
    text = json.dumps(result, indent=2)
    if ns.out is not None:
        ns.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
