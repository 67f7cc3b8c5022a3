"""The benchmark's gateway configs load with the current config rules (a `make bench` run would
otherwise stop at its first row)."""

from __future__ import annotations

from pathlib import Path

from bench.configs import RunContext, load_gateway_config


def test_bench_gateway_config_loads(tmp_path: Path) -> None:
    """Each bench config loads, and the keys the dev stack makes for it lie in its own state
    folder (a key path left relative to the checkout is refused at start-up)."""
    from gatewayctl.devstack.credentials import ensure_audit_key

    for transport in (None, "grpc", "http"):
        config = load_gateway_config(RunContext(tmp_path / (transport or "default")), transport)
        assert [s.name for s in config.servers] == ["bench"]
        assert not config.aggregate.enabled
        ensure_audit_key(config)
        assert config.audit.signing_key is not None
        assert Path(config.audit.signing_key).is_relative_to(config.state_dir)


def test_trust_variants_load_with_their_switches(tmp_path: Path) -> None:
    """bench/trust_cpu.py's stacks differ only in inner_tls, identity.assertion and the event
    loop; every switch is measured on uvloop, and both ends of it on the standard loop too."""
    from bench.trust_cpu import VARIANTS, _config
    from gateway.config import load_config
    seen = {}
    for label, (inner_tls, assertion, loop) in VARIANTS.items():
        folder = tmp_path / label.replace("+", "-").replace("@", "-")
        folder.mkdir()
        config = load_config(_config(folder, inner_tls, assertion))
        seen[label] = (config.inner_tls.enabled, config.identity.assertion, loop)
        assert [s.name for s in config.servers] == ["bench"]
    assert seen == VARIANTS
    assert {loop for *_, loop in VARIANTS.values()} == {"uvloop", "asyncio"}
    assert VARIANTS["plain@asyncio"][:2] == VARIANTS["plain"][:2]


def test_trust_row_verdict_follows_the_budget() -> None:
    """The targets row of the inner TLS + assertion comparison is met at or under 15 %, not over."""
    from bench.report import _trust_row, _trust_table
    by = {n: 100.0 for n in ("envoy", "ext_authz", "ext_proc", "backend")}
    trust = {"budget_percent": 15.0, "calls_per_variant": 10, "blocks": 1, "calls_per_block": 10,
             "gateway_cpu_us_per_call": {"plain": 400.0, "assertion": 420.0,
                                         "inner_tls+assertion": 440.0},
             "by_process_us_per_call": {"plain": by, "assertion": by, "inner_tls+assertion": by},
             "overhead_percent": {"assertion": 5.0, "inner_tls+assertion": 10.0}}
    assert _trust_row(trust)["met"] is True
    trust["overhead_percent"] = {"assertion": 5.0, "inner_tls+assertion": 15.1}
    row = _trust_row(trust)
    assert row["met"] is False and "by process" in row["bound"]
    assert any(line.startswith("| inner TLS on, assertion on |") for line in _trust_table(trust, "x"))
    assert _trust_row(None)["met"] is None


def test_comparisons_only_run_keeps_hand_added_notes(tmp_path: Path) -> None:
    """bench.run --only trust replaces the targets table and adds its section before the charts;
    every other section of benchmarks.md stays as it was."""
    import json

    from bench.report import merge_docs
    by = {n: 100.0 for n in ("envoy", "ext_authz", "ext_proc", "backend")}
    trust = {"calls_per_variant": 10, "gateway_cpu_us_per_call": {
                 "plain": 400.0, "assertion": 420.0, "inner_tls+assertion": 440.0},
             "by_process_us_per_call": {"plain": by, "assertion": by, "inner_tls+assertion": by},
             "overhead_percent": {"assertion": 5.0, "inner_tls+assertion": 10.0}}
    last = {"started": "T0", "mode": "full", "configurations": [], "workloads": {},
            "plan": {"levels": [1], "seconds": 1, "warmup": 1, "cf_levels": [1], "cf_seconds": 1},
            "machine": {"cpus": 2, "cpu_model": "x", "python": "3", "envoy": "1",
                        "loadavg_at_start": [0.0, 0.0, 0.0]}}
    (tmp_path / "benchmarks.json").write_text(json.dumps(last))
    (tmp_path / "benchmarks.md").write_text(
        "# Benchmarks\n\n## Targets (issue 9)\n\n| old row |\n\n## Charts\n\nold charts\n\n"
        "## Micro-benchmarks\n\na note added by hand\n")
    text = merge_docs({"trust": trust}, tmp_path, ("trust",)).read_text()
    assert "| old row |" not in text and "inner TLS + caller assertion <= +15 %" in text
    assert text.index("## Inner TLS and the caller assertion") < text.index("## Charts")
    assert "old charts" in text and "a note added by hand" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["trust"] == trust


def test_envoy_cost_variants_change_one_thing_each() -> None:
    """bench/envoy_cost.py's variants: each drops exactly what its name says from the rendered
    HTTP chain, on its own listen and admin ports; the floor keeps the check and the router."""
    from bench.envoy_cost import VARIANTS, variant_config
    hcm = {"http_filters": [{"name": f"envoy.filters.http.{n}"} for n in (
        "header_mutation", "local_ratelimit", "ext_authz", "ext_proc", "stateful_session", "router")],
        "access_log": [{"name": "envoy.access_loggers.stdout"}]}
    rendered = {"admin": {"address": {"socket_address": {"port_value": 1}}},
                "static_resources": {"listeners": [{
                    "name": "mcp_gateway_https", "address": {"socket_address": {"port_value": 2}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm}]}]}]}}
    names = [h["name"].rsplit(".", 1)[1] for h in hcm["http_filters"]]
    for label, change in VARIANTS.items():
        if change is None:
            continue
        doc = variant_config(rendered, change, 3, 4)
        assert doc["admin"]["address"]["socket_address"]["port_value"] == 4
        listener = doc["static_resources"]["listeners"][0]
        assert listener["address"]["socket_address"]["port_value"] == 3
        out = listener["filter_chains"][0]["filters"][0]["typed_config"]
        kept = [h["name"].rsplit(".", 1)[1] for h in out["http_filters"]]
        if label == "ext_authz_and_router_only":
            assert kept == ["ext_authz", "router"] and "access_log" not in out
        elif label == "no_access_log":
            assert kept == names and "access_log" not in out
        else:
            assert kept == [n for n in names if f"no_{n}" != label] and len(kept) == len(names) - 1
    assert hcm["http_filters"][0]["name"].endswith("header_mutation")  # the rendered one untouched
