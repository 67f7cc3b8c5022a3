"""The gateway config file: the embedded default loads, and mistakes are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config


def _default() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    return raw


def test_default_config_loads() -> None:
    """The embedded default has this project's servers with two instances each, one stdio
    server from PyPI (its own runtime) behind the bridge, and audiences per server."""
    cfg = load_config()
    assert [s.name for s in cfg.servers] == ["files", "database", "conformance", "workflow", "erp",
                                             "time"]
    # The workflow server owns its run record: one instance (docs/workflows.md).
    assert all(len(s.instances) == (1 if s.name == "workflow" else 2)
               for s in cfg.servers if s.kind == "module")
    time_server = cfg.server("time")
    assert time_server.kind == "command" and time_server.runtime is not None
    assert cfg.resource_url("files") == "https://127.0.0.1:8443/mcp/files"
    assert cfg.resource_url("files") in cfg.issuers[0].audiences
    assert cfg.policy.engine == "embedded"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"tls": {"cert_file": "a", "key_file": "b", "min_version": "TLSv1_0"}}, "tls.min_version"),
        ({"issuers": [{"issuer": "x", "jwks_url": "y", "algorithms": ["HS256"]}]}, "asymmetric"),
        ({"issuers": []}, "at least one token issuer"),
        ({"policy": {"engine": "opa"}}, "policy.opa_url is required"),
        ({"rate_limits": {"backend": "redis"}}, "rate_limits.redis_url is required"),
        ({"listen": {"port": 70000}}, "listen.port must be 1-65535"),
        ({"servers": {}}, "servers must be a non-empty mapping"),
        ({"catalog": {"mode": "yolo"}}, "catalog.mode"),
        ({"rate_limits": {"edge": {"rate_per_second": 2.5, "burst": 5}}}, "rate_limits.edge.rate_per_second"),
        ({"rate_limits": {"edge": {"rate_per_second": 0, "burst": 5}}}, "rate_limits.edge: rate_per_second"),
        ({"secrets": ["erp-key"]}, "secrets: 'erp-key' is not an environment variable name"),
        ({"secrets": []}, "servers.erp.env: 'ERP_API_KEY' is not listed in secrets"),
        ({"backends": {"erp_demo": {"module": "m"}}}, "backends.erp_demo.instance is required"),
        ({"backends": {"erp": {"module": "m", "instance": {"port": 1}}}}, "erp is also a server name"),
        ({"backends": {"b": {"module": "m", "instance": {"port": 1}, "health_path": "x"}}},
         "backends.b.health_path must start with '/'"),
        ({"telemetry": {"otlp_endpoint": "collector:4317"}}, "telemetry.otlp_endpoint"),
        ({"telemetry": {"trace_sample_percent": 150}}, "telemetry.trace_sample_percent"),
    ],
)
def test_invalid_configs_are_rejected_with_the_key_named(patch: dict[str, Any], message: str) -> None:
    """A contradiction or typo fails at load time with a message naming the key."""
    raw = {**_default(), **patch}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw, base_dir=Path.cwd())


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing config file is reported, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_dev_stack_sections_parse() -> None:
    """The default config runs the ERP backend with its secret, and an edge limit Envoy enforces."""
    cfg = load_config()
    (erp,) = cfg.backends
    assert erp.module == "mcp_servers.erp_demo" and erp.instance.port == 9230 and erp.env == ("ERP_API_KEY",)
    assert cfg.secrets == ("ERP_API_KEY", "MCP_GATEWAY_AGGREGATE_KEYS", "MCP_GATEWAY_AUDIT_MASTER_KEY")
    assert cfg.audit.master_key == "MCP_GATEWAY_AUDIT_MASTER_KEY"  # the dev stack seals, like deployments
    assert cfg.server("erp").env == ("ERP_API_KEY",)
    assert cfg.rate_limits.edge is not None and cfg.rate_limits.edge.burst == 2000
    assert cfg.telemetry.otlp_endpoint is None


def test_edge_limit_can_be_switched_off() -> None:
    """rate_limits.edge: null removes Envoy's edge limiter."""
    raw = _default()
    raw["rate_limits"] = {**raw["rate_limits"], "edge": None}
    assert parse_config(raw, base_dir=Path.cwd()).rate_limits.edge is None


def _with_ext_authz(**keys: Any) -> dict[str, Any]:
    raw = _default()
    raw["ext_authz"] = {**raw["ext_authz"], **keys}
    return raw


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_ext_authz_transport_parses(transport: str) -> None:
    """ext_authz.transport selects how Envoy calls ext_authz: grpc or http."""
    cfg = parse_config(_with_ext_authz(transport=transport), base_dir=Path.cwd())
    assert cfg.ext_authz.transport == transport


def test_ext_authz_transport_defaults_to_http_and_ext_proc_stays_grpc() -> None:
    """Without the key ext_authz uses Envoy's HTTP mode; ext_proc has only gRPC."""
    raw = _default()
    raw["ext_authz"] = {k: v for k, v in raw["ext_authz"].items() if k != "transport"}
    cfg = parse_config(raw, base_dir=Path.cwd())
    assert cfg.ext_authz.transport == "http"
    assert cfg.ext_proc.transport == "grpc"


@pytest.mark.parametrize("transport", ["bogus", "HTTP", "grpc-web", ""])
def test_unknown_ext_authz_transport_names_the_choices(transport: str) -> None:
    """Any other transport is a ConfigError naming the key, the choices and the value."""
    with pytest.raises(ConfigError, match=r"ext_authz\.transport must be one of ") as exc:
        parse_config(_with_ext_authz(transport=transport), base_dir=Path.cwd())
    choices = str(exc.value).split("one of ", 1)[1].rsplit(", not ", 1)[0]
    assert sorted(choices.split(", ")) == ["grpc", "http"]
    assert repr(transport) in str(exc.value)


def test_ext_authz_transport_must_be_a_string() -> None:
    """A non-string transport is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"ext_authz\.transport must be str"):
        parse_config(_with_ext_authz(transport=1), base_dir=Path.cwd())


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_ext_proc_has_no_transport_key(transport: str) -> None:
    """ext_proc is gRPC only: a transport key there is an unknown key, whatever its value."""
    raw = _default()
    raw["ext_proc"] = {**raw["ext_proc"], "transport": transport}
    with pytest.raises(ConfigError, match=r"ext_proc: unknown key\(s\) transport"):
        parse_config(raw, base_dir=Path.cwd())


@pytest.mark.parametrize(
    ("key", "bad"),
    [("eval_timeout_ms", 0), ("eval_timeout_ms", -5), ("eval_timeout_ms", "100"),
     ("eval_timeout_ms", 1.5), ("eval_timeout_ms", True), ("eval_timeout_ms", None),
     ("eval_timeout_ms", 60_001), ("eval_workers", 0), ("eval_workers", 257),
     ("eval_max_abandoned", -1), ("eval_max_waiting", -1), ("eval_max_waiting", "8")],
)
def test_policy_evaluation_bounds_are_validated(key: str, bad: Any) -> None:
    """policy.eval_* must be integers in range; the error names the key."""
    raw = _default()
    raw["policy"] = {**raw.get("policy", {}), key: bad}
    with pytest.raises(ConfigError, match=f"policy.{key} must be an integer"):
        parse_config(raw, base_dir=Path.cwd())


def test_policy_deadline_must_fire_before_envoys_timeout() -> None:
    """policy.eval_timeout_ms at or past ext_authz.timeout_ms is a contradiction naming both keys."""
    raw = _default()
    timeout = parse_config(raw, base_dir=Path.cwd()).ext_authz.timeout_ms
    raw["policy"] = {**raw.get("policy", {}), "eval_timeout_ms": timeout}
    with pytest.raises(ConfigError, match="policy.eval_timeout_ms .* ext_authz.timeout_ms"):
        parse_config(raw, base_dir=Path.cwd())
    raw["policy"]["eval_timeout_ms"] = timeout - 1
    assert parse_config(raw, base_dir=Path.cwd()).policy.eval_timeout_ms == timeout - 1


def test_policy_evaluation_defaults() -> None:
    """By default misses get a deadline well under Envoy's ext_authz timeout and a bounded pool."""
    cfg = load_config()
    assert 0 < cfg.policy.eval_timeout_ms <= cfg.ext_authz.timeout_ms // 2
    assert cfg.policy.eval_workers >= 1 and cfg.policy.eval_max_abandoned >= 0
    assert cfg.policy.eval_max_waiting >= 1


# ---------------------------------------------------------------- every setting typed and bounded


@pytest.mark.parametrize(("section", "key", "bad", "message"), [
    ("auth", "leeway_seconds", "abc", r"auth\.leeway_seconds must be an integer, got 'abc'"),
    ("auth", "leeway_seconds", -5, r"auth\.leeway_seconds must be an integer from 0 to 3600"),
    ("auth", "jwks_timeout_seconds", "5s", r"auth\.jwks_timeout_seconds must be a number, got '5s'"),
    ("auth", "max_token_bytes", True, r"auth\.max_token_bytes must be an integer, got True"),
    ("audit", "keep", "ten", r"audit\.keep must be an integer, got 'ten'"),
    ("audit", "keep", 0, r"audit\.keep must be an integer from 1"),
    ("audit", "otlp_export", "yes", r"audit\.otlp_export must be true or false"),
    ("audit", "dir", 5, r"audit\.dir must be str"),
    ("catalog", "refresh_seconds", -1, r"catalog\.refresh_seconds must be a number from 1"),
    ("catalog", "mode", 3, r"catalog\.mode must be a string"),
    ("telemetry", "log_level", None, r"telemetry\.log_level must be a string, got None"),
    ("telemetry", "trace_sample_percent", "all", r"telemetry\.trace_sample_percent must be a number"),
    ("policy", "dry_run", "false", r"policy\.dry_run must be true or false"),
    ("policy", "opa_url", 8181, r"policy\.opa_url must be a string or null"),
    ("ext_authz", "timeout_ms", 0, r"ext_authz\.timeout_ms must be from 1 to 60000, got 0"),
    ("ext_proc", "timeout_ms", -1, r"ext_proc\.timeout_ms must be from 1 to 60000"),
])
def test_a_bad_setting_is_refused_naming_its_key(section: str, key: str, bad: Any,
                                                 message: str) -> None:
    """Every plain setting is checked for its type and range when the file is read: a string
    where a number belongs, a zero timeout or a negative count never reaches a service (where it
    was a traceback or a silently odd behaviour)."""
    raw = _default()
    raw[section] = {**(raw.get(section) or {}), key: bad}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, base_dir=Path.cwd())


def test_a_whole_number_is_a_valid_number_setting() -> None:
    raw = _default()
    raw["auth"] = {**(raw.get("auth") or {}), "jwks_timeout_seconds": 2}
    assert parse_config(raw, base_dir=Path.cwd()).auth.jwks_timeout_seconds == 2


@pytest.mark.parametrize(("place", "message"), [
    (lambda raw, port: raw["servers"]["database"]["instances"].__setitem__(
        0, {"host": "127.0.0.1", "port": port}), r"servers\.database\.instances\[0\] and servers\.files"),
    (lambda raw, port: raw.__setitem__("admin", {"port": port}), r"servers\.files\.instances\[0\] and admin"),
    (lambda raw, port: raw["ext_authz"].__setitem__("instances", [{"host": "0.0.0.0", "port": port}]),
     r"servers\.files\.instances\[0\] and ext_authz\.instances\[0\]"),
])
def test_two_listeners_on_one_port_are_refused(place: Any, message: str) -> None:
    raw = _default()
    port = raw["servers"]["files"]["instances"][0]["port"]
    place(raw, port)
    with pytest.raises(ConfigError, match=message + r".* both listen on port " + str(port)):
        parse_config(raw, base_dir=Path.cwd())


def test_one_port_on_two_distinct_hosts_is_allowed() -> None:
    """In Kubernetes or compose each service has its own host: the same port number is fine."""
    raw = _default()
    port = raw["servers"]["files"]["instances"][0]["port"]
    raw["ext_proc"]["instances"] = [{"host": "10.0.0.7", "port": port}]
    assert parse_config(raw, base_dir=Path.cwd()).ext_proc.instances[0].port == port


def test_the_embedded_default_loaded_by_its_path_resolves_like_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev stack hands the embedded default's path to the aggregator: its state_dir and the
    key files under it are the same ones the stack made (the working directory's), not a folder
    beside the packaged file."""
    monkeypatch.chdir(tmp_path)
    by_default, by_path = load_config(), load_config(DEFAULT_CONFIG_PATH)
    assert by_path.state_dir == by_default.state_dir == str(tmp_path / ".run")
    assert by_path.identity.jwks_file == by_default.identity.jwks_file
