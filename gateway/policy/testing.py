"""Run Rego unit tests (``test_*`` rules) with regopy, which has no ``opa test``.

Each test rule becomes an entrypoint of one bundle built from every module in the folder
(tests included); a test passes when its rule is defined and true, as in ``opa test``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.policy.decision import ContractViolation, check_decision
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.rego import CompiledPolicy, load_sources, query_interpreter

# rego-cpp 1.5 fails to compile `with input as <value>` and can abort the whole process while
# building the bundle (policies/README.md, quirks). The serving engine builds in a checker child
# first (gateway.policy.check); the test runner builds here, so it refuses the construct with
# the file and line instead of dying without either.
_WITH_WHOLE_INPUT_RE = re.compile(r"\bwith\s+input\s+as\b")


def _refuse_crashing_constructs(name: str, source: str) -> None:
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("#", 1)[0]  # a '#' inside a string only hides the rest of that line
        if _WITH_WHOLE_INPUT_RE.search(code):
            raise PolicyCompileError(
                f"{name}:{number}: `with input as ...` is not supported by the embedded engine "
                "(it can abort the process); replace the fields you need one by one "
                "(`with input.mcp as ...`, `with input.token as ...`)")


@dataclass(frozen=True, slots=True)
class TestResult:
    file: str
    package: str
    name: str
    status: str  # "PASS" | "FAIL" | "ERROR"
    detail: str = ""
    duration_us: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


def discover_and_run(policy_dir: str | os.PathLike[str], *,
                     run: re.Pattern[str] | None = None) -> list[TestResult]:
    """Compile the folder and run every test rule (with ``run``, those whose full name
    ``data.<package>.<rule>`` it matches anywhere); raise PolicyCompileError if it does not
    compile."""
    sources = load_sources(policy_dir, include_tests=True)
    for module in sources.modules:
        _refuse_crashing_constructs(module.name, module.source)
    tests: list[tuple[str, str, str]] = []  # (file, package, rule)
    for module in sources.modules:
        package = module.package
        if package is None:
            continue
        tests.extend((module.name, package, rule) for rule in module.test_rules()
                     if run is None or run.search(f"data.{package}.{rule}"))
    if not tests:
        query_interpreter(sources, include_tests=True)  # still report compile errors
        return []
    entrypoints = [f"{pkg.replace('.', '/')}/{rule}" for _, pkg, rule in tests]
    compiled = CompiledPolicy(sources, entrypoints, include_tests=True)
    results = []
    for (file, package, rule), ep in zip(tests, entrypoints, strict=True):
        start = time.perf_counter()
        try:
            defined, value = compiled.evaluate(ep, {})
        except PolicyError as exc:
            status, detail = "ERROR", str(exc)
        else:
            if defined and value is True:
                status, detail = "PASS", ""
            elif not defined:
                status, detail = "FAIL", "undefined"
            else:
                status, detail = "FAIL", f"result {value!r:.80}"
        results.append(TestResult(file, package, rule, status, detail,
                                  (time.perf_counter() - start) * 1e6))
    return results


@dataclass(frozen=True, slots=True)
class ContractResult:
    """A decision the policy gives a sample request that ext_authz would refuse (a 500)."""

    request: str  # e.g. "role=admin server=files tools/call read_file"
    problem: str


# Methods every sample request of a role and server tries besides each of the role's tools.
SAMPLE_METHODS = ("initialize", "tools/list", "resources/list", "prompts/list", "ping")
MAX_CONTRACT_SAMPLES = 2000


def sample_inputs(data: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Sample requests for every role and server ``data.gateway`` names (the example policy's
    layout; none for another layout): the protocol methods and a call of each granted tool, as
    ext_authz's input carries them."""
    gateway = data.get("gateway")
    if not isinstance(gateway, dict):
        return []
    roles, servers = gateway.get("roles"), gateway.get("servers")
    if not isinstance(roles, dict) or not isinstance(servers, dict):
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    for role, grant in roles.items():
        for server in servers:
            tools = grant.get("tools", {}).get(server, []) if isinstance(grant, dict) else []
            names = [t for t in tools if isinstance(t, str)] if isinstance(tools, list) else []
            calls = [("tools/call", t.replace("*", "x") or "x") for t in names]
            for method, tool in [*((m, None) for m in SAMPLE_METHODS), *calls]:
                mcp: dict[str, Any] = {"kind": "request", "method": method, "arguments": {}}
                if tool is not None:
                    mcp.update(tool=tool, name=tool)
                out.append((f"role={role} server={server} {method}{' ' + tool if tool else ''}", {
                    "mcp": mcp, "server": {"name": server, "resource": f"https://gw/mcp/{server}"},
                    "token": {"sub": "policy-test", "roles": [role], "tenant": "acme",
                              "scope": f"tools:call:{server}/*"}}))
                if len(out) >= MAX_CONTRACT_SAMPLES:
                    return out
    return out


def check_contract(policy_dir: str | os.PathLike[str], entrypoint: str) -> list[ContractResult]:
    """Decide every sample request (:func:`sample_inputs`) with the folder's policy and return
    the decisions outside the decision contract: a policy whose tests pass can still make every
    allowed request a 500 in production (a reserved header, an unknown PII kind)."""
    sources = load_sources(policy_dir, include_tests=False)
    data: dict[str, Any] = {}
    for name, raw in sources.data:
        if name == "data.json":
            loaded = orjson.loads(raw)
            data = loaded if isinstance(loaded, dict) else {}
    samples = sample_inputs(data)
    if not samples:
        return []
    compiled = CompiledPolicy(sources, [entrypoint])
    problems = []
    for label, policy_input in samples:
        try:
            defined, value = compiled.evaluate(entrypoint, policy_input)
            check_decision(value, defined=defined)
        except (ContractViolation, PolicyError) as exc:
            problems.append(ContractResult(label, str(exc)))
    return problems
