"""Run Rego unit tests (``test_*`` rules) and check what a policy folder decides.

Two runners, as in ``opa test``: a test passes when its rule is defined and true.

* OPA (``run_tests_opa``, the default of ``policy test``): OPA itself in-process
  (``gateway.policy.reference``), ~30 ms to compile the folder with its tests. Every selected test
  is evaluated in one query (OPA prepares each distinct query string with a full compile, ~40 ms,
  so one query per test would cost ~2.5 s for the shipped suite); when that query fails on a
  runtime error, the batch is split in halves until the tests that error are alone. A failing
  test is evaluated once more on its own with a trace, which names the failing expression, its
  source line and the values of its variables. Every decision of the entrypoint that a test
  computes is checked against the decision contract (``check_decision``): see
  ``_decision_hook``.
* rego-cpp (``discover_and_run``, ``--engine embedded``): the serving engine. Each test rule
  becomes an entrypoint of one bundle built from every module (tests included); rego-cpp spends
  ~5 s and ~2.5 GB compiling the shipped suite.

``check_samples`` decides sample requests for every role and server of ``data.gateway`` with
rego-cpp and with OPA: a decision outside the contract, or the two engines deciding differently,
is a failure of ``policy test``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from gateway.policy.decision import ContractViolation, check_decision
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.reference import ReferenceEngine
from gateway.policy.rego import (
    CompiledPolicy,
    PolicyModule,
    PolicySources,
    load_sources,
    query_interpreter,
)

# rego-cpp 1.5 fails to compile `with input as <value>` and can abort the whole process while
# building the bundle (policies/README.md, quirks). The serving engine builds in a checker child
# first (gateway.policy.check); the test runner builds here, so it refuses the construct with
# the file and line instead of dying without either.
_WITH_WHOLE_INPUT_RE = re.compile(r"\bwith\s+input\s+as\b")

MAX_VALUE_CHARS = 300  # a variable's value in a failure explanation
MAX_CHAIN = 6  # nested failing expressions shown for one failure (test -> helper -> ...)


def _refuse_crashing_constructs(name: str, source: str) -> None:
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("#", 1)[0]  # a '#' inside a string only hides the rest of that line
        if _WITH_WHOLE_INPUT_RE.search(code):
            raise PolicyCompileError(
                f"{name}:{number}: `with input as ...` is not supported by the embedded engine "
                "(it can abort the process); replace the fields you need one by one "
                "(`with input.mcp as ...`, `with input.token as ...`)")


@dataclass(frozen=True, slots=True)
class TestCase:
    """One ``test_*`` rule: where it is and how to refer to it."""

    file: str
    package: str
    name: str
    line: int

    @property
    def full_name(self) -> str:
        return f"data.{self.package}.{self.name}"

    @property
    def ref(self) -> str:
        return "data" + "".join(f'["{part}"]' for part in [*self.package.split("."), self.name])


@dataclass(frozen=True, slots=True)
class TestResult:
    file: str
    package: str
    name: str
    status: str  # "PASS" | "FAIL" | "ERROR"
    detail: str = ""
    duration_us: float = 0.0  # 0 when the test ran in a batch with others
    line: int = 0  # of the test rule's head
    explanation: tuple[str, ...] = ()  # failing expression, values, error location

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


def discover(sources: PolicySources, run: re.Pattern[str] | None = None) -> list[TestCase]:
    """The ``test_*`` rules of the folder in source order (with ``run``, those whose full name
    ``data.<package>.<rule>`` or whose rule name alone it matches anywhere, so ``^test_open``
    works as ``opa test --run`` users expect)."""
    tests: list[TestCase] = []
    for module in sources.modules:
        package = module.package
        if package is None:
            continue
        for rule in module.test_rules():
            if run is None or run.search(f"data.{package}.{rule}") or run.search(rule):
                tests.append(TestCase(module.name, package, rule, _head_line(module.source, rule)))
    return tests


def _head_line(source: str, rule: str) -> int:
    match = re.search(rf"^{re.escape(rule)}\b", source, re.MULTILINE)
    return source.count("\n", 0, match.start()) + 1 if match else 0


# ----------------------------------------------------------------------------- rego-cpp runner

def discover_and_run(policy_dir: str | os.PathLike[str], *,
                     run: re.Pattern[str] | None = None) -> list[TestResult]:
    """Run the tests on rego-cpp, the serving engine (slow: see the module docstring); raise
    PolicyCompileError if the folder does not compile."""
    sources = load_sources(policy_dir, include_tests=True)
    for module in sources.modules:
        _refuse_crashing_constructs(module.name, module.source)
    tests = discover(sources, run)
    if not tests:
        query_interpreter(sources, include_tests=True)  # still report compile errors
        return []
    entrypoints = [f"{t.package.replace('.', '/')}/{t.name}" for t in tests]
    compiled = CompiledPolicy(sources, entrypoints, include_tests=True)
    results = []
    for test, ep in zip(tests, entrypoints, strict=True):
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
                status, detail = "FAIL", f"result {_short(value, 80)}"
        results.append(TestResult(test.file, test.package, test.name, status, detail,
                                  (time.perf_counter() - start) * 1e6, test.line))
    return results


# ----------------------------------------------------------------------------- OPA runner

_TEST_MARK = "__mcp_gateway_test__"
_DECISION_MARK = "__mcp_gateway_decision__"
_HOOK_FILE = "__mcp_gateway_decision_hook.rego"
_IMPL_SUFFIX = "__mcp_gateway_impl"


def _decision_hook(sources: PolicySources, entrypoint: str) -> tuple[PolicySources, str] | str:
    """Sources in which every decision of ``entrypoint`` announces itself, and the hook module;
    or why the hook cannot be set up.

    The entrypoint rule's heads are renamed (``decision`` -> ``decision__mcp_gateway_impl``,
    lines unchanged) and a module in the same package defines the entrypoint again as that
    value, printing it with the input it was computed for (OPA's ``print``, captured by the
    bridge). A test's result does not change (the value is the same, and an undefined or
    conflicting decision stays so), and every evaluation the tests cause is seen, whether bound
    to a variable or compared inline, in a helper or in the test itself. Evaluations OPA serves
    from its cache within one query (the same rule without ``with``) are seen once.
    """
    package, _, rule = entrypoint.replace("/", ".").rpartition(".")
    if not package or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule):
        return f"entrypoint {entrypoint!r} is not data.<package>.<rule>"
    head = re.compile(rf"^(default\s+)?{rule}(?=\s*(?::=|=|if\b|\{{))", re.MULTILINE)
    other_head = re.compile(rf"^{rule}\s*(?:contains\b|\[|\.)", re.MULTILINE)
    impl = rule + _IMPL_SUFFIX
    modules: list[PolicyModule] = []
    renamed = 0
    for module in sources.modules:
        if module.package != package or module.is_test:
            modules.append(module)
            continue
        if other_head.search(module.source):
            return f"{module.name}: {rule} is a partial rule; only complete rules are hooked"
        source, count = head.subn(lambda m: (m.group(1) or "") + impl, module.source)
        renamed += count
        modules.append(replace(module, source=source))
    if not renamed:
        if not any(m.package == package for m in sources.modules):
            return ""  # a folder of tests for another package: nothing to check
        return f"no rule {rule} in package {package}"
    hook = (f"package {package}\n\nimport rego.v1\n\n"
            f"{rule} := {impl}__all[0] if {{\n"
            f'\tprint(json.marshal(["{_DECISION_MARK}", {impl}__all, [i | i := input]]))\n'
            f"}}\n\n{impl}__all := [d | d := {impl}]\n")
    return replace(sources, modules=tuple(modules)), hook


@dataclass(slots=True)
class _Outcome:
    status: str
    detail: str = ""
    explanation: list[str] = field(default_factory=list)
    decisions: list[tuple[list[Any], list[Any]]] = field(default_factory=list)


class _Batch:
    """Tests evaluated together in one OPA query (``ReferenceEngine`` offers no query with
    prints and trace, so this talks to its bridge directly, under its lock)."""

    def __init__(self, ref: ReferenceEngine) -> None:
        import opa_bindings  # installed, or ReferenceEngine() has raised already

        self._ref = ref
        self._error = opa_bindings.OpaError

    def run(self, tests: Sequence[TestCase]) -> dict[int, _Outcome]:
        """Outcome of each test by position; a runtime error is narrowed down by halving."""
        if not tests:
            return {}
        query = "; ".join(f'mcpgw_t{i} := [v | print("{_TEST_MARK} {i}"); v := {t.ref}]'
                          for i, t in enumerate(tests))
        engine: Any = self._ref._engine  # noqa: SLF001 - see the class docstring
        with self._ref._lock:  # noqa: SLF001
            try:
                rows = engine.eval_query(query)
            except self._error as exc:
                error = str(getattr(exc, "message", "") or exc)
            else:
                error = ""
            prints = list(engine.last_prints or [])
        if error:
            if len(tests) == 1:
                return {0: _Outcome("ERROR", *_error_lines(error, self._ref.sources))}
            half = len(tests) // 2
            first = self.run(tests[:half])
            second = self.run(tests[half:])
            return {**first, **{i + half: o for i, o in second.items()}}
        bindings = rows[0] if rows else {}
        outcomes: dict[int, _Outcome] = {}
        for i in range(len(tests)):
            values = bindings.get(f"mcpgw_t{i}", [])
            if values == [True]:
                outcomes[i] = _Outcome("PASS")
            elif not values:
                outcomes[i] = _Outcome("FAIL", "undefined")
            else:
                outcomes[i] = _Outcome("FAIL", f"result {_short(values[0], 80)}")
        current: int | None = None
        for message, _location in prints:
            if message.startswith(_TEST_MARK + " "):
                current = int(message.split()[1])
            elif current is not None and message.startswith(f'["{_DECISION_MARK}"'):
                _, decisions, inputs = json.loads(message)
                outcomes[current].decisions.append((decisions, inputs))
        return outcomes


def run_tests_opa(policy_dir: str | os.PathLike[str], *, run: re.Pattern[str] | None = None,
                  entrypoint: str | None = None) -> tuple[list[TestResult], list[str]]:
    """Run the tests on OPA; with ``entrypoint``, fail a test any of whose decisions of it is
    outside the decision contract. Returns the results and notes (what could not be checked).
    Raises PolicyCompileError naming file and line when OPA does not compile the folder."""
    sources = load_sources(policy_dir, include_tests=True)
    tests = discover(sources, run)
    notes: list[str] = []
    ref: ReferenceEngine | None = None
    if entrypoint is not None and tests:
        hooked = _decision_hook(sources, entrypoint)
        if isinstance(hooked, str):
            if hooked:
                notes.append(f"decisions computed in tests are not contract-checked: {hooked}")
        else:
            candidate = ReferenceEngine(hooked[0], include_tests=True,
                                        extra_modules=[(_HOOK_FILE, hooked[1])])
            if candidate.findings:  # reported below, against the folder as written
                candidate.close()
                notes.append("decisions computed in tests are not contract-checked: the hook "
                             f"does not compile ({candidate.findings[0]})")
            else:
                ref = candidate
    if ref is None:
        ref = ReferenceEngine(sources, include_tests=True)
    try:
        ref.require_compiled()
        start = time.perf_counter()
        outcomes = _Batch(ref).run(tests)
        batch_us = (time.perf_counter() - start) * 1e6
        results = []
        for i, test in enumerate(tests):
            outcome = outcomes[i]
            if outcome.status == "FAIL":
                outcome.explanation = _explain_failure(ref, test, outcome.detail)
            problems = _contract_problems(outcome.decisions, entrypoint or "")
            if problems:
                if outcome.status == "PASS":
                    outcome.status, outcome.detail = "FAIL", "a decision outside the contract"
                outcome.explanation.extend(problems)
            results.append(TestResult(test.file, test.package, test.name, outcome.status,
                                      outcome.detail, 0.0 if len(tests) > 1 else batch_us,
                                      test.line, tuple(outcome.explanation)))
        return results, notes
    finally:
        ref.close()


def _contract_problems(decisions: list[tuple[list[Any], list[Any]]], entrypoint: str) -> list[str]:
    lines: list[str] = []
    for values, inputs in decisions:
        try:
            check_decision(values[0] if values else None, defined=bool(values))
        except ContractViolation as exc:
            shown = f"input {_short(inputs[0], 200)}" if inputs else "no input"
            line = f"contract: {entrypoint} for {shown}: {exc}"
            if line not in lines:
                lines.append(line)
    return lines


# ----------------------------------------------------------------------------- explanations

def _short(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _source_line(sources: PolicySources, location: str) -> str:
    file, _, line = location.rpartition(":")
    for module in sources.modules:
        if module.name == file and line.isdigit():
            lines = module.source.splitlines()
            number = int(line)
            return lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return ""


_RULE_START_RE = re.compile(r"^(?:default\s+)?([A-Za-z_][A-Za-z0-9_]*)")


def rule_at(sources: PolicySources, file: str, line: int) -> str | None:
    """The rule whose definition holds ``file:line`` (the nearest head at or above it)."""
    for module in sources.modules:
        if module.name != file:
            continue
        lines = module.source.splitlines()
        for number in range(min(line, len(lines)), 0, -1):
            match = _RULE_START_RE.match(lines[number - 1])
            if match and match.group(1) not in ("package", "import", "else"):
                return match.group(1).removesuffix(_IMPL_SUFFIX)
    return None


_RUNTIME_ERROR_RE = re.compile(r"(?P<file>[^\s:][^:\n]*\.rego):(?P<line>\d+): (?P<kind>\w+): "
                               r"(?P<message>[^\n]*)")


def _error_lines(text: str, sources: PolicySources) -> tuple[str, list[str]]:
    """(detail, explanation) of a runtime error: OPA's message, and for each location the
    rule it lies in and the source line."""
    found = list(_RUNTIME_ERROR_RE.finditer(text))
    if not found:
        return text.strip(), []
    detail = "; ".join(m.group(0) for m in found)
    lines = []
    for m in found:
        rule = rule_at(sources, m["file"], int(m["line"]))
        location = f"{m['file']}:{m['line']}"
        where = location + (f" (rule {rule})" if rule else "")
        lines.append(f"error at {where}: {_source_line(sources, location)}")
        lines.append(f"  {m['kind']}: {m['message']}")
    return detail, lines


def describe_error(text: str, sources: PolicySources) -> list[str]:
    """A runtime error OPA reports, with the rule and source line of each location."""
    return _error_lines(text, sources)[1]


def _explain_failure(ref: ReferenceEngine, test: TestCase, detail: str) -> list[str]:
    try:
        _, _, events = ref.evaluate(f"{test.package}.{test.name}", None, trace=True)
    except PolicyError as exc:  # it failed in the batch; a lone evaluation should not error
        return [f"re-evaluated alone: {exc}"]
    return explain_failure(events, ref.sources, test) or [f"{detail} (no failing expression "
                                                          "in the trace)"]


def explain_failure(events: Sequence[Mapping[str, Any]], sources: PolicySources,
                    test: TestCase) -> list[str]:
    """The expression of the test body that failed last, then (where it failed inside a helper
    rule or function of a test module) the expression that failed there, each with its source
    line, the values it compared and the variables of that line."""
    test_files = {m.name for m in sources.modules if m.is_test}
    bodies = {e.get("query_id") for e in events
              if e.get("op") == "Enter" and str(e.get("location", "")).startswith(test.file + ":")
              and re.match(rf"{re.escape(test.name)}\b", str(e.get("node", "")))}
    top = None
    for position, event in enumerate(events):
        if event.get("op") == "Fail" and event.get("query_id") in bodies:
            top = position
    if top is None:
        return []
    lines: list[str] = []
    index: int | None = top
    depth = 0
    while index is not None and depth < MAX_CHAIN:
        event = events[index]
        location = str(event.get("location", ""))
        indent = "  " * depth
        lines.append(f"{indent}{'failed' if depth == 0 else 'which failed'} at {location}: "
                     f"{_source_line(sources, location) or event.get('node', '')}")
        previous = _previous(events, index)
        if previous is not None and events[previous].get("op") == "Unify" \
                and events[previous].get("query_id") == event.get("query_id"):
            node = str(events[previous].get("node", ""))
            if "__local" not in node and node != event.get("node"):
                lines.append(f"{indent}  compared: {node}")
        text = _source_line(sources, location)
        local_values = event.get("locals") or {}
        for name, value in sorted(local_values.items()):
            if re.search(rf"\b{re.escape(name)}\b", text):
                lines.append(f"{indent}  {name} = {_short(value)}")
        # Descend when the expression failed because a rule or function it called failed.
        index = None
        if previous is not None:
            child = events[previous]
            if child.get("op") == "Fail" and child.get("parent_id") == event.get("query_id") \
                    and str(child.get("location", "")).rpartition(":")[0] in test_files:
                index = previous
        depth += 1
    return lines


def _previous(events: Sequence[Mapping[str, Any]], index: int) -> int | None:
    for j in range(index - 1, -1, -1):
        if events[j].get("op") != "Redo":
            return j
    return None


MAX_EXPLAIN_LINES = 60


def explain_decision(events: Sequence[Mapping[str, Any]], sources: PolicySources,
                     entrypoint: str, *, limit: int = MAX_EXPLAIN_LINES) -> list[str]:
    """The rules of the entrypoint's package that decided one request, from an OPA trace, in
    evaluation order, each location once and at most ``limit`` lines:

    * ``held``: a rule body that succeeded (its head line);
    * ``failed``: the expression that stopped a body of the entrypoint rule, and, following
      the failure down, of each rule that expression names and that ended undefined (no body
      held): why ``granted`` did not hold, then why the rule it needed did not, and so on.
      Bodies that failed where another body of the same rule held, and rules no failed
      expression on that path names, are left out.
    """
    package, _, entry_rule = entrypoint.replace("/", ".").rpartition(".")
    files = {m.name for m in sources.modules if m.package == package and not m.is_test}
    rule_of: dict[Any, str] = {}
    for e in events:
        location = str(e.get("location", ""))
        if e.get("op") == "Enter" and location.rpartition(":")[0] in files:
            match = _RULE_BODY_RE.match(str(e.get("node", "")))
            if match:
                rule_of[e.get("query_id")] = match.group(1).removesuffix(_IMPL_SUFFIX)
    held_rules = {rule_of[e.get("query_id")] for e in events
                  if e.get("op") == "Exit" and e.get("query_id") in rule_of}
    failures: dict[str, list[str]] = {}  # rule -> source text of the expressions that failed
    for e in events:
        if e.get("op") == "Fail" and e.get("query_id") in rule_of:
            text = _source_line(sources, str(e.get("location", "")))
            failures.setdefault(rule_of[e.get("query_id")], []).append(text)
    on_path = {entry_rule}
    pending = [entry_rule]
    while pending:
        rule = pending.pop()
        for text in failures.get(rule, []):
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
                if word in failures and word not in held_rules and word not in on_path:
                    on_path.add(word)
                    pending.append(word)
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for e in events:
        qid = e.get("query_id")
        op = e.get("op")
        if qid not in rule_of or op not in ("Exit", "Fail"):
            continue
        rule = rule_of[qid]
        location = str(e.get("location", ""))
        if op == "Fail" and rule not in on_path:
            continue
        key = (str(op), location)
        if key in seen:
            continue
        seen.add(key)
        text = _source_line(sources, location)
        if not re.match(rf"(?:default\s+)?{re.escape(rule)}\b", text):
            text = f"{rule}: {text}"
        lines.append(f"  {'held' if op == 'Exit' else 'failed':<7} {location:<16} {text}"[:160])
    if len(lines) > limit:
        rest = len(lines) - limit
        lines = [*lines[:limit], f"  ... and {rest} more (rules evaluated later)"]
    return lines


# How OPA prints a rule body it enters: `name := v if {`, `name(args) = v if {`, `name contains
# x if {`; negations, `every` and comprehensions enter queries too, and are not rules.
_RULE_BODY_RE = re.compile(r"(?!__local)([A-Za-z_][A-Za-z0-9_]*)(?:\([^)]*\))?"
                           r"(?:\[[^\]]*\])?\s+(?::=|=|contains|if)\s")


# ----------------------------------------------------------------------------- sample requests

@dataclass(frozen=True, slots=True)
class ContractResult:
    """A decision the policy gives a sample request that ext_authz would refuse (a 500)."""

    request: str  # e.g. "role=admin server=files tools/call read_file"
    problem: str


@dataclass(frozen=True, slots=True)
class ParityResult:
    """A sample request rego-cpp (the embedded engine) and OPA decide differently."""

    request: str
    embedded: str
    opa: str


@dataclass(frozen=True, slots=True)
class SampleReport:
    samples: int
    contract: list[ContractResult]
    parity: list[ParityResult]


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


def _outcome(evaluate: Callable[[str, Any], tuple[bool, Any]], entrypoint: str,
             policy_input: Any) -> tuple[str, Any]:
    try:
        defined, value = evaluate(entrypoint, policy_input)
    except PolicyError as exc:
        return "error", str(exc)
    return ("value", value) if defined else ("undefined", None)


def _without_trace(ref: ReferenceEngine) -> Callable[[str, Any], tuple[bool, Any]]:
    def evaluate(entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        defined, value, _ = ref.evaluate(entrypoint, policy_input)
        return defined, value
    return evaluate


def _shown(outcome: tuple[str, Any]) -> str:
    kind, value = outcome
    return _short(value, 200) if kind == "value" else ("undefined" if kind == "undefined"
                                                        else f"error: {value}")


def check_samples(policy_dir: str | os.PathLike[str], entrypoint: str, *,
                  parity: bool = True) -> SampleReport:
    """Decide every sample request (:func:`sample_inputs`) with rego-cpp (what production
    decides) and return the decisions outside the decision contract: a policy whose tests pass
    can still make every allowed request a 500 (a reserved header, an unknown PII kind). With
    ``parity``, decide each with OPA too and return every request the engines decide
    differently (a value, undefined, or an error on one side only): production on rego-cpp and
    a deployment on a remote OPA would not agree."""
    sources = load_sources(policy_dir, include_tests=False)
    data: dict[str, Any] = {}
    for name, raw in sources.data:
        if name == "data.json":
            loaded = orjson.loads(raw)
            data = loaded if isinstance(loaded, dict) else {}
    samples = sample_inputs(data)
    if not samples:
        return SampleReport(0, [], [])
    compiled = CompiledPolicy(sources, [entrypoint])
    problems: list[ContractResult] = []
    differences: list[ParityResult] = []
    ref = ReferenceEngine(sources) if parity else None
    try:
        if ref is not None and ref.findings:
            differences.append(ParityResult("(the whole folder)", "compiles",
                                            "refused: " + "; ".join(map(str, ref.findings[:3]))))
            ref.close()
            ref = None
        for label, policy_input in samples:
            embedded = _outcome(compiled.evaluate, entrypoint, policy_input)
            try:
                if embedded[0] == "error":
                    raise PolicyError(embedded[1])
                check_decision(embedded[1], defined=embedded[0] == "value")
            except (ContractViolation, PolicyError) as exc:
                problems.append(ContractResult(label, str(exc)))
            if ref is not None:
                opa = _outcome(_without_trace(ref), entrypoint, policy_input)
                if embedded[0] != opa[0] or (embedded[0] == "value" and embedded[1] != opa[1]):
                    if not (embedded[0] == opa[0] == "error"):
                        differences.append(ParityResult(label, _shown(embedded), _shown(opa)))
    finally:
        if ref is not None:
            ref.close()
    return SampleReport(len(samples), problems, differences)


def check_contract(policy_dir: str | os.PathLike[str], entrypoint: str) -> list[ContractResult]:
    """The sample decisions outside the decision contract (``check_samples`` without OPA)."""
    return check_samples(policy_dir, entrypoint, parity=False).contract
