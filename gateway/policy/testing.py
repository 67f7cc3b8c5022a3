"""Run Rego unit tests (``test_*`` rules) with regopy, which has no ``opa test``.

Each test rule becomes an entrypoint of one bundle built from every module in the folder
(tests included); a test passes when its rule is defined and true, as in ``opa test``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from gateway.policy.errors import PolicyError
from gateway.policy.rego import CompiledPolicy, load_sources, query_interpreter


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
