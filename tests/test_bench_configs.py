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
        assert config.aggregate.enabled  # as the default config has it (echo_aggregate)
        ensure_audit_key(config)
        assert config.audit.signing_key is not None
        assert Path(config.audit.signing_key).is_relative_to(config.state_dir)
        assert config.audit.sync == "batch"
    interval = load_gateway_config(RunContext(tmp_path / "interval"), None, "interval")
    assert interval.audit.sync == "interval" and Path(interval.state_dir).name == "state-audit-interval"


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


def _run(workload: str, connections: int, rps: float, p50: float,
         cpu: dict[str, float]) -> dict[str, object]:
    return {"workload": workload, "connections": connections, "rps": rps, "p50_ms": p50,
            "p99_ms": p50 * 3, "errors": 0, "ok": int(rps * 8), "wrk_cpu_s": 0.1,
            "processes": {role: {"cpu_us_per_req": us, "peak_rss_mb": 50.0}
                          for role, us in cpu.items()}}


def _result(plain_rps: float, plain_p50: float) -> dict[str, object]:
    """A run with the backend directly, Envoy-TLS-only and the gateway (both its paths)."""
    direct = {"key": "direct", "python_roles": ["backend"], "runs": [
        _run("echo", 1, 900.0, 1.0, {"backend": 400.0}), _run("echo", 16, 1000.0, 9.0, {"backend": 400.0})]}
    envoy = {"key": "envoy_tls", "python_roles": ["backend"], "runs": [
        _run("echo", 1, 700.0, 1.2, {"backend": 400.0, "envoy": 150.0}),
        _run("echo", 16, 800.0, 10.0, {"backend": 400.0, "envoy": 150.0})]}
    cpu = {"ext_authz": 400.0, "ext_proc": 500.0, "envoy": 400.0, "backend": 400.0}
    gateway = {"key": "gateway", "python_roles": ["backend", "ext_authz", "ext_proc"], "runs": [
        _run("echo", 1, 300.0, 3.5, cpu), _run("echo", 16, 400.0, 20.0, cpu),
        _run("echo_plain", 1, 500.0, 2.0, {**cpu, "ext_proc": 0.0}),
        _run("echo_plain", 16, plain_rps, plain_p50, {**cpu, "ext_proc": 0.0})]}
    return {"started": "T", "configurations": [direct, envoy, gateway],
            "machine": {"cpus": 2}}


def test_issue_18_targets_compare_each_path_with_its_baseline() -> None:
    """The uninspected path is held against the backend called directly (echo_plain, ext_proc
    off), the inspected one against Envoy-TLS-only; each verdict moves with its own numbers."""
    from bench.report import evaluate
    rows = {row["target"].split(" ")[0]: row for row in evaluate(_result(650.0, 2.0))}
    assert rows["uninspected"]["met"] is True  # 650 / 1000 >= 0.6, +1.0 ms at c=1
    assert "0.65x" in rows["uninspected"]["value"]
    assert rows["inspected"]["met"] is True  # 400 / 800 >= 0.45, +2.3 ms at c=1
    cpu_row = next(row for row in evaluate(_result(650.0, 2.0)) if row["target"].startswith("CPU"))
    assert cpu_row["met"] is True
    low = {row["target"].split(" ")[0]: row for row in evaluate(_result(550.0, 2.0))}
    assert low["uninspected"]["met"] is False and "CPU per request" in low["uninspected"]["bound"]


def test_per_path_tables_put_each_path_beside_the_baselines() -> None:
    from bench.report import _path_tables
    text = "\n".join(_path_tables(_result(650.0, 2.0)))
    uninspected = text.split("### Uninspected", 1)[1].split("###", 1)[0]
    assert "| gateway `echo_plain` | 650 (16) | 0.65 | 0.81 | 2.00 |" in uninspected
    assert "| direct | 1000 (16) | 1.00 |" in uninspected
    assert "ext_proc only on routes whose answer needs it" in text


def test_gateway_only_workloads_run_where_their_role_and_path_exist() -> None:
    from bench.loadgen import WORKLOADS, Target
    plain = Target("http://127.0.0.1:1/mcp")
    gateway = Target("https://127.0.0.1:2/mcp/bench", token="t", tokens={"admin": "a"},
                     urls={"aggregate": "https://127.0.0.1:2/mcp"})
    assert [w for w in WORKLOADS.values() if not plain.serves(w)] == [
        WORKLOADS["echo_plain"], WORKLOADS["echo_aggregate"]]
    assert all(gateway.serves(w) for w in WORKLOADS.values())


def test_in_function_levers_reach_the_lever_table() -> None:
    """bench/bench_levers.py's before/after figures become rows of the levers table."""
    import json

    from bench.report import _lever_table
    result = _result(650.0, 2.0)
    levers = [{"lever": "policy bundle revision", "before": "hashed per read", "after": "set once",
               "before_us": 46.8, "after_us": 0.1}]
    stdout = "| table |\nJSON " + json.dumps(levers)
    result["micro"] = {"bench_levers.py": {"returncode": 0, "stdout": stdout}}
    text = "\n".join(_lever_table(result))
    assert "| policy bundle revision: set once | kept | hashed per read: 46.8 us | 0.1 us |" in text


def _ports(node: object) -> list[int]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "port" and isinstance(v, int)] + [
            p for k, v in node.items() if k != "port" for p in _ports(v)]
    if isinstance(node, list):
        return [p for v in node for p in _ports(v)]
    return []


def test_bench_config_ports_never_meet_a_metrics_port(tmp_path: Path) -> None:
    """Every port of a bench config is distinct from every other and from every port + the
    metrics offset (the dev stack refuses a config where a listener meets a /metrics port)."""
    from bench.configs import gateway_config_raw
    for n in range(30):
        raw = gateway_config_raw(RunContext(tmp_path / str(n)))
        ports = _ports(raw)
        offset = raw["telemetry"]["metrics_port_offset"]
        assert len(ports) >= 8
        assert len(set(ports) | {p + offset for p in ports}) == 2 * len(ports)


def test_aggregate_bench_config_loads(tmp_path: Path) -> None:
    """bench/aggregate_cpu.py's stack: the aggregate endpoint on, its session keys and the
    audit master key both listed as secrets."""
    from bench.aggregate_cpu import KEYS, _config
    from gateway.config import load_config
    config = load_config(_config(tmp_path))
    assert config.aggregate.enabled and config.aggregate.session_keys == KEYS
    assert config.audit.master_key in config.secrets and KEYS in config.secrets
