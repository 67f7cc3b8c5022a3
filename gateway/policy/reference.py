"""OPA itself, in-process, as the reference engine of the policy kit (never on the request path).

The gateway serves decisions with rego-cpp (``gateway.policy.rego``: fast, embedded), but
rego-cpp compiles policies that OPA refuses (an unbound variable, a reference to a rule that does
not exist, Rego v0 syntax) and some built-ins behave differently. The policy kit therefore also
compiles and evaluates every policy with OPA's own Go engine (``opa-golib-python-bindings``:
OPA's ``v1/rego`` package in a c-shared library behind ctypes; see docs/dependencies.md for why
this package), so that:

* ``policy check`` reports what ``opa check --strict`` reports, with file and line;
* ``policy test`` runs the Rego tests on OPA (fast, with a trace of the failing expression);
* every difference between the two engines on the same input is visible (``policy test``
  compares the decisions of both on sample requests; ``tests/gateway/policy/parity``).

OPA is used here as a library: the bridge compiles with OPA's strict mode (unused imports and
unused declared variables, `some x` or the key of `every k, v`, are errors; an assigned variable
nothing reads, `x := 1`, is not) and strict built-in errors (a type error in a built-in is an
error, not undefined), which is stricter than a remote OPA server's default and only ever
refuses more.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.policy.errors import PolicyCompileError, PolicyEvalError
from gateway.policy.rego import PolicySources, _data_document

try:  # installed by `make install` (pip --ignore-requires-python; docs/dependencies.md)
    import opa_bindings as _opa
except ImportError:  # pragma: no cover - exercised only on an incomplete install
    _opa = None

INSTALL_HINT = ("pip install --ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4 "
                "(`make install` does it)")
# "p/x.rego:2: rego_unsafe_var_error: var y is unsafe" (a message may continue on later lines).
_ERROR_LINE_RE = re.compile(r"^(?P<file>[^\s:][^:\n]*\.rego):(?P<line>\d+): (?P<kind>rego_\w+): "
                            r"(?P<message>.*)$")
_ERRORS_HEADER_RE = re.compile(r"^(?:\w+: )*(?:bundle activation failed: )?"
                               r"(?:\d+ errors? occurred:\s*)?")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem OPA reports in a policy: where, of which kind, and what."""

    file: str
    line: int
    kind: str  # OPA's error code: rego_parse_error, rego_unsafe_var_error, rego_type_error, ...
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} ({self.kind})"


class ReferenceUnavailable(PolicyCompileError):
    """The OPA library is not installed: checks that need it cannot run (and do not pass)."""


def available() -> bool:
    return _opa is not None


def parse_findings(text: str) -> list[Finding]:
    """OPA's error text as findings; text without a location becomes one finding on line 0."""
    findings: list[Finding] = []
    body = _ERRORS_HEADER_RE.sub("", text.strip(), count=1)
    for raw in re.split(r"\n(?=[^\s:][^:\n]*\.rego:\d+: rego_)|(?<=\S) (?=[^\s:][^:\n]*\.rego:\d+: rego_)",
                        body):
        first, _, rest = raw.partition("\n")
        match = _ERROR_LINE_RE.match(first.strip())
        if match is None:
            if raw.strip():
                findings.append(Finding("", 0, "error", raw.strip()))
            continue
        message = match["message"]
        if rest.strip():  # type errors continue with "have: ... want: ..." lines
            message += " (" + "; ".join(p.strip() for p in rest.splitlines() if p.strip()) + ")"
        findings.append(Finding(match["file"], int(match["line"]), match["kind"], message))
    return findings


def _error_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) and message else str(exc)


class ReferenceEngine:
    """One policy folder compiled by OPA; evaluations are serialised (the bridge is one engine)."""

    def __init__(self, sources: PolicySources, *, include_tests: bool = False,
                 extra_modules: Iterable[tuple[str, str]] = ()) -> None:
        if _opa is None:
            raise ReferenceUnavailable(f"OPA (the reference engine) is not installed: {INSTALL_HINT}")
        self.sources = sources
        self._lock = threading.Lock()
        self._engine = _opa.OpaEngine()
        self._engine.print_handler = lambda message, location: None
        findings: list[Finding] = []
        try:
            for name, raw in sources.data:
                self._engine.add_data(orjson.loads(_data_document(name, raw)))
        except _opa.OpaError as exc:
            raise PolicyCompileError(f"data: {_error_text(exc)}") from None
        modules = [(m.name, m.source) for m in sources.modules if include_tests or not m.is_test]
        for name, source in [*modules, *extra_modules]:
            try:
                self._engine.add_policy(name, source)
            except _opa.OpaError as exc:  # a parse error: each module is parsed as it is added
                findings.extend(parse_findings(_error_text(exc)))
        if not findings:
            try:  # the bridge compiles every module together on the first query
                self._engine.eval_query("true")
            except _opa.OpaError as exc:
                findings.extend(parse_findings(_error_text(exc)))
        self.findings = tuple(findings)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> ReferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_compiled(self) -> None:
        if self.findings:
            raise PolicyCompileError("\n".join(map(str, self.findings)))

    def evaluate(self, path: str, value: Any = None, *,
                 trace: bool = False) -> tuple[bool, Any, list[dict[str, Any]]]:
        """``data.<path>`` (slashes or dots) with ``value`` as input: (defined, value, trace).

        Raises PolicyEvalError naming file, line and error for a runtime error (a conflict, a
        built-in's type error), as OPA reports it.
        """
        assert _opa is not None
        self.require_compiled()
        dotted = path.replace("/", ".")
        with self._lock:
            try:
                result = self._engine.eval_document(dotted, value, trace=trace)
            except _opa.OpaUndefinedError:
                return False, None, list(self._engine.last_trace or [])
            except _opa.OpaError as exc:
                text = _error_text(exc)
                findings = parse_findings(text)
                detail = "; ".join(map(str, findings)) if findings and findings[0].line else text
                raise PolicyEvalError(f"evaluation of data.{dotted} failed: {detail}") from None
            return True, result, list(self._engine.last_trace or [])

    def query(self, query: str, value: Any = None) -> list[Mapping[str, Any]]:
        """Bindings of an ad-hoc query (``rego.parse_module(...)``, a comparison, ...)."""
        assert _opa is not None
        self.require_compiled()
        with self._lock:
            try:
                return list(self._engine.eval_query(query, value))
            except _opa.OpaError as exc:
                raise PolicyEvalError(f"query {query!r} failed: {_error_text(exc)}") from None


def standalone_query(query: str, value: Any = None) -> list[Mapping[str, Any]]:
    """A query on an engine holding no policy (``rego.parse_module`` for static analysis)."""
    if _opa is None:
        raise ReferenceUnavailable(f"OPA (the reference engine) is not installed: {INSTALL_HINT}")
    engine = _opa.OpaEngine()
    try:
        return list(engine.eval_query(query, value))
    except _opa.OpaError as exc:
        raise PolicyEvalError(f"query {query!r} failed: {_error_text(exc)}") from None
    finally:
        engine.close()
