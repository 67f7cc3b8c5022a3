"""Constructs whose meaning differs between rego-cpp (serving) and OPA: see findings.

Each check answers a difference that tests/gateway/policy/parity/cases.yaml shows and that can
turn an allow into a deny (or back) between the embedded engine and OPA; policies/README.md,
"Engine differences (rego-cpp vs OPA)", lists them all, including those left to `policy test`.
The checks read the source text: string contents and comments are masked first (offsets kept,
so a finding names the line), and anything the scanner cannot read is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.policy.reference import Finding
from gateway.policy.rego import PolicyModule, PolicySources

KIND = "rego_engine_parity"

_NUMERIC_TEXT_RE = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*|\s*0[xXoObB][0-9a-fA-F_]+\s*")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![A-Za-z0-9_])")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# <, <=, >, >= (not the `:=` / `==` / `!=` family, nor a `<` inside `<=` counted twice).
_ORDERING_RE = re.compile(r"(?<![<>=!:])(<=|>=|<|>)(?!=)")
_NOT_RE = re.compile(r"(?<![A-Za-z0-9_.])not\s+")
_CALL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(")
_IN_RE = re.compile(r"(?<![A-Za-z0-9_.])in(?![A-Za-z0-9_])")
_CONCAT_SET_RE = re.compile(r"(?<![A-Za-z0-9_.])concat\s*\(\s*\"[^\"]*\"\s*,\s*\{")
_REGEX_CALL_RE = re.compile(r"(?<![A-Za-z0-9_])(?:regex\.[a-z_]+|re_match)\s*\(\s*(?=[\"`])")
_BACKREFERENCE_RE = re.compile(r"\\[1-9]")
_SCALAR_WORDS = ("null", "true", "false")
# `name := "2000"`, `name = "2000"`, `default name := "2000"`: a name that holds a string.
_STRING_ASSIGN_RE = re.compile(r'(?<![A-Za-z0-9_.])([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(?=")')
_IMPORT_RE = re.compile(r"^\s*import\s+(?:data|input)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
                        r"(?:\s+as\s+([A-Za-z_][A-Za-z0-9_]*))?", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class _Masked:
    """A module's source with comments blanked and string contents masked, offsets unchanged."""

    source: str
    code: str
    strings: dict[int, str]  # offset of the opening quote -> the literal's text (escapes as written)

    def line(self, offset: int) -> int:
        return self.source.count("\n", 0, offset) + 1


def _mask(source: str) -> _Masked:
    out = list(source)
    strings: dict[int, str] = {}
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":
            j = source.find("\n", i)
            j = n if j == -1 else j
            out[i:j] = " " * (j - i)
            i = j
        elif c in "\"`":
            j = i + 1
            while j < n and source[j] != c and not (c == '"' and source[j] == "\n"):
                j += 2 if c == '"' and source[j] == "\\" else 1
            j = min(j, n - 1)
            strings[i] = source[i + 1:j]
            for k in range(i + 1, j):
                if out[k] != "\n":
                    out[k] = "x"
            out[i] = out[j] = '"'
            i = j + 1
        else:
            i += 1
    return _Masked(source, "".join(out), strings)


def _operand_before(code: str, end: int) -> tuple[int, str]:
    """Start and text of the operand ending just before ``end`` (a literal or a ref, postfix
    parts included: ``f(x)[0]``, ``a.b[c]``)."""
    j = end
    while j > 0 and code[j - 1] in " \t":
        j -= 1
    stop = j
    while j > 0:
        c = code[j - 1]
        if c in ")]}":
            depth = 0
            while j > 0:
                j -= 1
                if code[j] in ")]}":
                    depth += 1
                elif code[j] in "([{":
                    depth -= 1
                    if depth == 0:
                        break
        elif c == '"':
            j = code.rfind('"', 0, j - 1)
        elif c.isalnum() or c in "_.":
            while j > 0 and (code[j - 1].isalnum() or code[j - 1] in "_."):
                j -= 1
        else:
            break
    return j, code[j:stop]


def _operand_after(code: str, start: int) -> tuple[int, str]:
    """Start and text of the operand beginning just after ``start``."""
    j = start
    while j < len(code) and code[j] in " \t":
        j += 1
    m = re.compile(r'"[^"\n]*"|[\[{(]|-?[A-Za-z0-9_.]+').match(code, j)
    return j, (m.group(0) if m else "")


def numeric_string_names(masked: _Masked) -> frozenset[str]:
    """Names (rules and local variables) assigned a string that looks like a number: compared
    with `<` or `>` they order as strings on OPA and as numbers on rego-cpp."""
    names = set()
    for m in _STRING_ASSIGN_RE.finditer(masked.code):
        if _NUMERIC_TEXT_RE.fullmatch(masked.strings.get(m.end(), "")):
            names.add(m.group(1))
    return frozenset(names)


def _literal_kind(masked: _Masked, start: int, text: str,
                  numeric_names: frozenset[str] = frozenset()) -> str | None:
    """"numeric_string", "string", "number", "composite" or "scalar" for a literal or a name
    known to hold a numeric-looking string; else None."""
    if text.rsplit(".", 1)[-1] in numeric_names and _IDENT_RE.fullmatch(text.rsplit(".", 1)[-1]):
        return "numeric_string"
    if text.startswith('"'):
        value = masked.strings.get(start, "")
        return "numeric_string" if _NUMERIC_TEXT_RE.fullmatch(value) else "string"
    if _NUMBER_RE.fullmatch(text):
        return "number"
    if text in _SCALAR_WORDS:
        return "scalar"
    if text[:1] in "[{":  # a ref never starts with a bracket: an array, object or set
        return "composite"
    if text.startswith("set(") or text == "set()":
        return "composite"
    return None


def _ordering_findings(name: str, masked: _Masked,
                       numeric_names: frozenset[str] = frozenset()) -> Iterator[Finding]:
    code = masked.code
    for m in _ORDERING_RE.finditer(code):
        left_start, left = _operand_before(code, m.start())
        right_start, right = _operand_after(code, m.end())
        kinds = {_literal_kind(masked, left_start, left, numeric_names),
                 _literal_kind(masked, right_start, right, numeric_names)}
        # Shown as written (the scan masks string contents).
        left = masked.source[left_start:left_start + len(left)]
        right = masked.source[right_start:right_start + len(right)]
        reason = None
        if "numeric_string" in kinds:
            reason = ("an ordering comparison with a string that looks like a number: OPA orders "
                      "every number before every string, rego-cpp does not; write the number")
        elif {"number", "string"} <= kinds:
            reason = "an ordering comparison of a number with a string: OPA and rego-cpp disagree"
        elif kinds & {"composite", "scalar"}:
            reason = ("an ordering comparison with null, a boolean, an array, an object or a set: "
                      "rego-cpp does not order them as OPA does")
        if reason:
            yield Finding(name, masked.line(m.start()), KIND, f"`{left} {m.group(1)} {right}`: {reason}")


def _expression_end(code: str, start: int) -> int:
    """Where the expression starting at ``start`` ends (a newline, `;` or a closing brace at depth 0)."""
    depth = 0
    for j in range(start, len(code)):
        c = code[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return j
            depth -= 1
        elif depth == 0 and c in ";\n":
            return j
    return len(code)


def _may_be_undefined(expr: str, rules: frozenset[str]) -> list[str]:
    """The refs in ``expr`` that may be undefined: input, data, or a rule of the package."""
    found = []
    for m in _IDENT_RE.finditer(expr):
        word = m.group(0)
        before = expr[m.start() - 1] if m.start() else ""
        after = expr[m.end():].lstrip()[:1]
        if before == "." or after == "(":  # a field of something, or a function's name
            continue
        if word in ("input", "data") or word in rules:
            found.append(word)
    return found


def _negation_findings(name: str, masked: _Masked, rules: frozenset[str]) -> Iterator[Finding]:
    code = masked.code
    for m in _NOT_RE.finditer(code):
        expr = code[m.end():_expression_end(code, m.end())]
        calls = [c.group(1) for c in _CALL_RE.finditer(expr)]
        if not calls and not _IN_RE.search(expr):
            continue
        refs = _may_be_undefined(expr, rules)
        if refs:
            what = f"{calls[0]}()" if calls else "`in`"
            yield Finding(name, masked.line(m.start()), KIND,
                          f"`not` over {what} with {refs[0]} as an argument: when {refs[0]} is "
                          "undefined OPA leaves the expression undefined and rego-cpp makes it "
                          "true; test a rule instead (`not r` with `r if ...`)")


def _concat_set_findings(name: str, masked: _Masked) -> Iterator[Finding]:
    for m in _CONCAT_SET_RE.finditer(masked.code):
        yield Finding(name, masked.line(m.start()), KIND,
                      "concat() over a set: OPA joins the elements in sorted order, rego-cpp does "
                      "not; join a sorted array (concat(sep, sort(s)))")


def _regex_findings(name: str, masked: _Masked) -> Iterator[Finding]:
    for m in _REGEX_CALL_RE.finditer(masked.code):
        pattern = masked.strings.get(m.end(), "")
        if _BACKREFERENCE_RE.search(pattern.replace("\\\\", "\\") if masked.code[m.end()] == '"'
                                    else pattern):
            yield Finding(name, masked.line(m.start()), KIND,
                          "a backreference in a regular expression: OPA (RE2) refuses it, an "
                          "error; rego-cpp matches it")


def import_aliases(masked: _Masked) -> frozenset[str]:
    """The names a module's imports bind (``import data.mcp.authz`` binds ``authz``): refs
    through them may be undefined like the rules they name."""
    names = set()
    for m in _IMPORT_RE.finditer(masked.code):
        alias = m.group(2) or (m.group(1).rsplit(".", 1)[-1] if m.group(1) else "")
        if alias and alias != "v1":  # `import rego.v1` never matches (not data/input)
            names.add(alias)
    return frozenset(names)


def module_findings(module: PolicyModule, rules: frozenset[str],
                    numeric_names: frozenset[str] = frozenset()) -> list[Finding]:
    masked = _mask(module.source)
    local = numeric_names | numeric_string_names(masked)
    refs = rules | import_aliases(masked)
    found = [*_ordering_findings(module.name, masked, local),
             *_negation_findings(module.name, masked, refs),
             *_concat_set_findings(module.name, masked), *_regex_findings(module.name, masked)]
    return sorted(found, key=lambda f: f.line)


def findings(sources: PolicySources) -> list[Finding]:
    """Constructs in the non-test modules that can decide differently on the two engines."""
    modules = [m for m in sources.modules if not m.is_test]
    rules = frozenset(name for m in modules for name in m.rule_names())
    # A rule constant of one module is compared in another through its package (org.limit).
    numeric = frozenset(n for m in modules for n in numeric_string_names(_mask(m.source)))
    return [f for m in modules for f in module_findings(m, rules, numeric)]
