"""A thin, fast layer over regopy (Microsoft rego-cpp): load a policy folder, compile it once into
a bundle, evaluate entrypoints of that bundle.

Why not regopy's high-level ``Output`` / ``set_input_term``: measured here, setting the input
as a Rego term costs ~440 us for a realistic policy input and ``regoSetInputJSON`` ~620 us,
while building the input node by node through the C API costs ~1 us per JSON node (~160 us for
a full input with headers); and ``Output`` parses results with the stdlib and turns some
evaluation errors into exceptions from ``json.loads``. This module calls the same C functions
that regopy binds (``regopy.rego_shared``) and classifies every outcome itself.

Threads: an interpreter holds the current input, so one interpreter serves one thread at a time.
A compiled bundle is shared read-only by any number of interpreters, each on its own thread
(rego-cpp's VM keeps all query state in the interpreter and its per-query ``State``; trieste
nodes are reference-counted atomically; the one lazy step, turning the built bundle node into
the runtime bundle on its first query, is done at construction, before any sharing). The
serving path splits an evaluation in three (``lookup`` on the loop: pruning, the cache and
building the input; ``run_pending`` on a worker with its own interpreter; ``finish`` on the
loop: parsing and caching), so the worker holds the GIL only for a handful of C calls.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import orjson
import regopy
from regopy import rego_shared as _rs

from gateway.policy.cache import DecisionCache, input_key, nondeterministic_builtins
from gateway.policy.errors import (
    PolicyCompileError,
    PolicyEvalError,
    PolicyInputError,
    PolicyInputRefused,
)

_lib = _rs.rego
_new_input = _lib.regoNewInput
_free_input = _lib.regoFreeInput
_set_input = _lib.regoSetInput
_in_str = _lib.regoInputString
_in_int = _lib.regoInputInt
_in_float = _lib.regoInputFloat
_in_bool = _lib.regoInputBoolean
_in_null = _lib.regoInputNull
_in_item = _lib.regoInputObjectItem
_in_object = _lib.regoInputObject
_in_array = _lib.regoInputArray
_query_entrypoint = _lib.regoBundleQueryEntrypoint
_output_ok = _lib.regoOutputOk
_free_output = _lib.regoFreeOutput

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
MAX_INPUT_DEPTH = 64
# A data.json is checked against this JSON Schema when one lies beside it (policies/data.schema.json).
DATA_SCHEMA = "data.schema.json"
MAX_DATA_ERRORS = 10  # shown at once; the rest follow once these are fixed

ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
# rego-cpp reports a location as "<len>:<file>|<byte offset>|<length>" inside its error tree.
_ERROR_LOCATION_RE = re.compile(r"\(error \d+:([^|\s]+)\|(\d+)\|(\d+)")
_ERROR_MSG_RE = re.compile(r"\(errormsg (\d+):")
_PACKAGE_RE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)
_TEST_RULE_RE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)
_RULE_HEAD_RE = re.compile(r"^(?:default\s+)?([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()", re.MULTILINE)
_KEYWORDS = frozenset({"package", "import", "default", "else"})


def new_interpreter() -> regopy.Interpreter:
    """An interpreter for one evaluation thread (it holds that thread's current input)."""
    return _quiet_interpreter()


def _quiet_interpreter() -> regopy.Interpreter:
    interp = regopy.Interpreter()
    # rego-cpp prints compile and plan errors to stdout by default; we report them ourselves.
    interp.log_level = regopy.LogLevel.NONE
    return interp


@dataclass(frozen=True, slots=True)
class PolicyModule:
    name: str  # path relative to the policy folder, used in error messages
    source: str

    @property
    def package(self) -> str | None:
        match = _PACKAGE_RE.search(self.source)
        return match.group(1) if match else None

    @property
    def is_test(self) -> bool:
        return self.name.endswith("_test.rego")

    def test_rules(self) -> list[str]:
        """Names of ``test_*`` rules, in source order, each once."""
        return list(dict.fromkeys(_TEST_RULE_RE.findall(self.source)))

    def rule_names(self) -> list[str]:
        """Names of the (non-function) rules this module defines, in source order."""
        names = (n for n in _RULE_HEAD_RE.findall(self.source) if n not in _KEYWORDS)
        return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class PolicySources:
    """Everything read from a policy folder: Rego modules and ``data.json`` documents."""

    root: str
    modules: tuple[PolicyModule, ...]
    data: tuple[tuple[str, bytes], ...]  # (relative path, JSON text) of each data.json
    # The bundle's revision: computed once, because every decision logs and audits it (hashing
    # the whole bundle per request was ~10 % of ext_authz's event loop).
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        for m in self.modules:
            h.update(m.name.encode() + b"\0" + m.source.encode() + b"\0")
        for name, text in self.data:
            h.update(name.encode() + b"\0" + text + b"\0")
        object.__setattr__(self, "digest", h.hexdigest()[:16])


def _policy_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".rego") or name in ("data.json", DATA_SCHEMA):
                files.append(Path(dirpath) / name)
    return files


def fingerprint(root: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """A cheap change detector: (path, mtime_ns, size) of every policy file."""
    result = []
    for path in _policy_files(Path(root)):
        try:
            st = path.stat()
        except FileNotFoundError:  # removed between listing and stat: the next check sees it
            continue
        result.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(result)


def load_sources(root: str | os.PathLike[str], *, include_tests: bool = True) -> PolicySources:
    """Read every ``*.rego`` and ``data.json`` under ``root`` (OPA bundle layout)."""
    base = Path(root)
    if not base.is_dir():
        raise PolicyCompileError(f"policy folder {base} does not exist or is not a folder")
    modules: list[PolicyModule] = []
    data: list[tuple[str, bytes]] = []
    for path in _policy_files(base):
        rel = path.relative_to(base).as_posix()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyCompileError(f"cannot read {rel}: {exc.strerror}") from None
        if path.name == DATA_SCHEMA:
            continue  # read with the data.json beside it
        if path.name == "data.json":
            _check_data(rel, raw, path.with_name(DATA_SCHEMA))
            data.append((rel, raw))
            continue
        try:
            module = PolicyModule(rel, raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolicyCompileError(f"{rel}: not valid UTF-8") from None
        if include_tests or not module.is_test:
            modules.append(module)
    if not any(not m.is_test for m in modules):
        raise PolicyCompileError(f"no .rego policy files in {base}")
    return PolicySources(str(base), tuple(modules), tuple(data))


def _check_data(rel: str, raw: bytes, schema_path: Path) -> None:
    """A data.json with a ``data.schema.json`` beside it must match that JSON Schema: a misspelt
    key or an unknown value is refused at load, naming it, instead of quietly granting or masking
    less than the author meant."""
    if not schema_path.is_file():
        return
    try:
        schema = orjson.loads(schema_path.read_bytes())
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PolicyCompileError(f"{rel} or its {DATA_SCHEMA}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise PolicyCompileError(f"cannot read {DATA_SCHEMA} beside {rel}: {exc.strerror}") from None
    try:
        validator = jsonschema.Draft202012Validator(schema)
    except jsonschema.SchemaError as exc:
        raise PolicyCompileError(f"{DATA_SCHEMA} beside {rel} is not a valid schema: "
                                 f"{exc.message}") from None
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{rel}: /{'/'.join(map(str, e.absolute_path))}: {e.message}"
                 for e in errors[:MAX_DATA_ERRORS]]
        raise PolicyCompileError("\n".join(lines))


def _data_document(rel: str, raw: bytes) -> bytes:
    """Place a data.json at the path its folder names (OPA bundle semantics)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PolicyCompileError(f"{rel}: invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PolicyCompileError(f"{rel}: a data document must be a JSON object")
    for part in reversed(Path(rel).parent.parts):
        value = {part: value}
    return orjson.dumps(value)


def _format_compile_error(text: str, sources: Mapping[str, str]) -> str:
    """Turn rego-cpp's error tree into ``file:line:col: message`` lines."""
    lines = []
    for block in text.split("(error ")[1:]:
        block = "(error " + block
        msg_match = _ERROR_MSG_RE.search(block)
        message = "compile error"
        if msg_match:
            start = msg_match.end()
            message = block[start:start + int(msg_match.group(1))]
        loc = _ERROR_LOCATION_RE.search(block)
        if loc and loc.group(1) in sources:
            src = sources[loc.group(1)].encode()
            offset = int(loc.group(2))
            before = src[:offset]
            line = before.count(b"\n") + 1
            col = offset - (before.rfind(b"\n") + 1) + 1
            lines.append(f"{loc.group(1)}:{line}:{col}: {message}")
        elif loc:
            lines.append(f"{loc.group(1)}: {message}")
        else:
            lines.append(message)
    return "\n".join(dict.fromkeys(lines)) or text.strip()


def _interpreter_with(sources: PolicySources, modules: Iterable[PolicyModule]) -> regopy.Interpreter:
    interp = _quiet_interpreter()
    texts = {m.name: m.source for m in sources.modules}
    try:
        for name, raw in sources.data:
            interp.add_data_json(_data_document(name, raw).decode())
        for module in modules:
            interp.add_module(module.name, module.source)
    except regopy.RegoError as exc:
        raise PolicyCompileError(_format_compile_error(str(exc), texts)) from None
    return interp


@dataclass(slots=True)
class PendingEval:
    """A cache miss, ready for an interpreter: the input is already built in rego-cpp.

    ``handle`` (a regoInput) is owned by exactly one of ``CompiledPolicy.run_pending`` (which
    frees it) and ``CompiledPolicy.discard`` (when the evaluation never runs).
    """

    entrypoint: str
    ep: bytes
    key: tuple[str, bytes] | None
    handle: int


class CompiledPolicy:
    """A bundle compiled from one snapshot of the policy folder, with its entrypoints."""

    def __init__(self, sources: PolicySources, entrypoints: Sequence[str], *,
                 include_tests: bool = False, cache_size: int = 0) -> None:
        for ep in entrypoints:
            if not ENTRYPOINT_RE.match(ep):
                raise PolicyCompileError(f"invalid entrypoint {ep!r}: "
                                         "expected a path like mcp/authz/decision")
        if not entrypoints:
            raise PolicyCompileError("at least one entrypoint is required")
        self.sources = sources
        self.entrypoints = tuple(dict.fromkeys(entrypoints))
        modules = [m for m in sources.modules if include_tests or not m.is_test]
        texts = {m.name: m.source for m in sources.modules}
        interp = _interpreter_with(sources, modules)
        try:
            bundle = interp.build(None, list(self.entrypoints))
        except regopy.RegoError as exc:
            raise PolicyCompileError(_format_compile_error(str(exc), texts)) from None
        if not bundle.ok():
            raise PolicyCompileError("the policy bundle failed to build")
        self._bundle = bundle
        self._interp = _quiet_interpreter()
        # rego-cpp turns the built bundle into its runtime form on the first query, without a
        # lock: do it here, on one thread, before any worker shares the bundle.
        out = _query_entrypoint(self._interp._impl, bundle._impl, self.entrypoints[0].encode())
        if not out:
            raise PolicyCompileError(_format_compile_error(_rs.rego_get_error(self._interp._impl),
                                                           texts))
        _free_output(out)
        self.input_projection = input_projection(modules)
        self._ep_bytes = {ep: ep.encode() for ep in self.entrypoints}
        # Results are cached only when they are a function of the pruned input (cache.py).
        self.cache: DecisionCache | None = None
        self.cache_disabled_by: tuple[str, ...] = ()
        if cache_size > 0:
            self.cache_disabled_by = tuple(nondeterministic_builtins(_code_only(m.source) for m in modules))
            if not self.cache_disabled_by:
                self.cache = DecisionCache(cache_size)

    def evaluate(self, entrypoint: str, value: Any) -> tuple[bool, Any]:
        """Evaluate one entrypoint with ``value`` as input: (defined, result).

        Synchronous, on this policy's own interpreter: for one thread only (the CLI, the checks,
        tests). The services evaluate through ``lookup`` / ``run_pending`` / ``finish``.
        """
        step = self.lookup(entrypoint, value)
        if not isinstance(step, PendingEval):
            return step
        return self.finish(step, *self.run_pending(self._interp, step))

    def lookup(self, entrypoint: str, value: Any) -> tuple[bool, Any] | PendingEval:
        """The cached result, or the evaluation still to run (its input built in rego-cpp)."""
        ep = self._ep_bytes.get(entrypoint)
        if ep is None:
            raise PolicyEvalError(f"entrypoint {entrypoint!r} is not compiled into the bundle")
        pruned = project_input(value, self.input_projection)
        cache = self.cache
        key_bytes = None if cache is None else input_key(pruned)
        key = None
        if cache is not None and key_bytes is not None:
            key = (entrypoint, key_bytes)
            cached = cache.get(key)
            if cached is not None:
                return parse_output(cached, True, entrypoint)
        return PendingEval(entrypoint, ep, key, build_input(pruned))

    def run_pending(self, interp: regopy.Interpreter, pending: PendingEval) -> tuple[str, bool]:
        """rego-cpp's output text and success flag; frees the pending input.

        Safe on any thread whose interpreter is ``interp`` alone: the bundle is only read.
        """
        handle, pending.handle = pending.handle, 0
        try:
            if _set_input(interp._impl, handle) != 0:
                raise PolicyInputError("rego-cpp refused the policy input")
        finally:
            _free_input(handle)
        out = _query_entrypoint(interp._impl, self._bundle._impl, pending.ep)
        if not out:
            raise PolicyEvalError(f"rego-cpp returned no output for {pending.entrypoint}")
        try:
            ok = _output_ok(out)
            text = _rs.rego_output_string(out)
        finally:
            _free_output(out)
        return text, bool(ok)

    def finish(self, pending: PendingEval, text: str, ok: bool) -> tuple[bool, Any]:
        """Parse rego-cpp's answer and cache it (errors raise and are never stored)."""
        result = parse_output(text, ok, pending.entrypoint)
        if pending.key is not None and self.cache is not None:
            self.cache.put(pending.key, text)
        return result

    @staticmethod
    def discard(pending: PendingEval) -> None:
        """Free the input of an evaluation that will never run."""
        handle, pending.handle = pending.handle, 0
        if handle:
            _free_input(handle)


def parse_output(text: str, ok: bool, what: str) -> tuple[bool, Any]:
    if not ok:
        # Runtime errors (conflicting values of a complete rule, ...) carry no detail here.
        raise PolicyEvalError(f"evaluation of {what} failed (rego runtime error)")
    if text == "undefined":
        return False, None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        # rego-cpp reports some evaluation errors as an "ok" output holding an error tree.
        match = _ERROR_MSG_RE.search(text)
        detail = text[match.end():match.end() + int(match.group(1))] if match else text[:200]
        raise PolicyEvalError(f"evaluation of {what} failed: {detail}") from None
    if isinstance(doc, list):  # several result sets: only a query with bindings does that
        if len(doc) != 1:
            raise PolicyEvalError(f"{what} produced {len(doc)} results, expected one")
        doc = doc[0]
    exprs = doc.get("expressions") if isinstance(doc, dict) else None
    if not isinstance(exprs, list) or len(exprs) != 1:
        raise PolicyEvalError(f"unexpected output shape from rego-cpp for {what}")
    return True, exprs[0]


def query_interpreter(sources: PolicySources, *, include_tests: bool) -> regopy.Interpreter:
    """An interpreter with every module loaded, for ad-hoc queries (tests, explanations)."""
    modules = [m for m in sources.modules if include_tests or not m.is_test]
    return _interpreter_with(sources, modules)


def run_query(interp: regopy.Interpreter, query: str, value: Any = None) -> tuple[bool, Any]:
    """Compile and run an ad-hoc query (slow path: ~ms; never on the request path)."""
    if value is not None:
        set_input(interp, value)
    out = _rs.rego_query(interp._impl, query)
    if not out:
        texts: dict[str, str] = {}
        raise PolicyEvalError(_format_compile_error(_rs.rego_get_error(interp._impl), texts))
    try:
        ok = _output_ok(out)
        text = _rs.rego_output_string(out)
    finally:
        _free_output(out)
    return parse_output(text, ok, query)


# ----------------------------------------------------------------------------- input pruning

# Handing a JSON node to rego-cpp costs ~1-3 us, so the full gateway input (every header, the
# parsed body duplicating mcp.arguments, all token claims) costs more than most rule evaluation.
# A policy can only observe the input paths it names, so the engine passes only those: each
# `input.a.b` (or `input["a"]["b"]`) reference keeps the whole subtree under a.b, and a reference
# that is not a static path (`input`, `input[k]`, `object.get(input, ...)`) keeps everything at
# that level. Comments and string contents are ignored; anything the scanner cannot read keeps
# more input, never less. A static reference that is the sole argument of a type test
# (`is_object(input.a)`, `type_name(input.a)`, ...) needs only the type of the value: it keeps
# the key, and the value stays an object (with only the referenced keys) or stays as it is.

ALL: Mapping[str, Any] = MappingProxyType({})  # sentinel: keep the whole subtree (identity-compared)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code_only(source: str) -> str:
    """The source with comments removed and string literals emptied (same token boundaries)."""
    out: list[str] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":
            j = source.find("\n", i)
            i = n if j == -1 else j
        elif c == '"':
            j = i + 1
            while j < n and source[j] != '"' and source[j] != "\n":
                j += 2 if source[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "`":
            j = source.find("`", i + 1)
            out.append('""')
            i = n if j == -1 else j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _ref_path(code: str, pos: int) -> tuple[list[str], int]:
    """The static path after ``input`` at ``pos`` (empty when dynamic/bare) and where it ends."""
    path: list[str] = []
    n = len(code)
    while pos < n:
        if code[pos] == ".":
            m = _IDENT_RE.match(code, pos + 1)
            if not m:
                break
            path.append(m.group(0))
            pos = m.end()
        elif code.startswith('[""]', pos):
            # A string key: its text was emptied, so the reference is kept at this level.
            break
        else:
            break
    return path, pos


# Built-ins whose result depends only on the type of their argument.
_TYPE_TESTS = ("is_object", "is_string", "is_number", "is_boolean", "is_array", "is_set",
               "is_null", "type_name")
_TYPE_TEST_NAMES = "|".join(_TYPE_TESTS)
_TYPE_TEST_CALL_RE = re.compile(rf"(?<![A-Za-z0-9_.])(?:{_TYPE_TEST_NAMES})\(\s*\Z")
_CLOSE_RE = re.compile(r"\s*\)")
# A rule, function or import alias of the same name, or `with is_object as f` (which replaces
# the built-in by a function that may read deeper), would make the call mean something else.
# (rego-cpp accepts a function named like a built-in.)
_TYPE_TEST_SHADOW_RE = re.compile(
    rf"(?<![A-Za-z0-9_.])(?:{_TYPE_TEST_NAMES})\s*\([^()]*\)\s*(?::=|=(?!=)|if\b|\{{)"
    rf"|\b(?:as|with)\s+(?:{_TYPE_TEST_NAMES})\b")


def input_projection(modules: Iterable[PolicyModule]) -> Mapping[str, Any]:
    """A trie of the input paths the modules reference (``ALL`` where a subtree is kept whole)."""
    codes = [_code_only(module.source) for module in modules]
    type_tests_are_builtins = not any(_TYPE_TEST_SHADOW_RE.search(code) for code in codes)
    root: dict[str, Any] = {}
    for code in codes:
        for m in re.finditer(r"(?<![A-Za-z0-9_.])input(?![A-Za-z0-9_])", code):
            path, end = _ref_path(code, m.end())
            type_only = (type_tests_are_builtins
                         and _TYPE_TEST_CALL_RE.search(code, max(0, m.start() - 64), m.start()) is not None
                         and _CLOSE_RE.match(code, end) is not None)
            if not path:
                if type_only:
                    continue
                return ALL
            node = root
            for key in path[:-1]:
                child = node.get(key)
                if child is ALL:
                    break
                if child is None:
                    child = node[key] = {}
                node = child
            else:
                if type_only:
                    node.setdefault(path[-1], {})
                else:
                    node[path[-1]] = ALL
    return root


def project_input(value: Any, projection: Mapping[str, Any]) -> Any:
    """``value`` restricted to the projection (values that are not objects pass unchanged)."""
    if projection is ALL or type(value) is not dict:
        return value
    out = {}
    for key, sub in projection.items():
        if key in value:
            out[key] = project_input(value[key], sub)
    return out


# ----------------------------------------------------------------------------- input


def set_input(interp: regopy.Interpreter, value: Any) -> None:
    """Hand ``value`` (JSON-shaped Python data) to the interpreter as ``input``."""
    handle = build_input(value)
    try:
        if _set_input(interp._impl, handle) != 0:
            raise PolicyInputError("rego-cpp refused the policy input")
    finally:
        _free_input(handle)


def build_input(value: Any) -> int:
    """A regoInput holding ``value``; the caller frees it (``regoFreeInput``).

    It belongs to no interpreter: it can be built on one thread and set on another.
    """
    handle = _new_input()
    if not handle:
        raise PolicyInputError("rego-cpp could not allocate an input")
    try:
        _add(handle, value, 0)
    except BaseException:
        _free_input(handle)
        raise
    return int(handle)


def _add(h: int, v: Any, depth: int) -> None:
    t = type(v)
    if t is str:
        if "\x00" in v:
            # The C API takes NUL-terminated strings: the policy would see a truncated value.
            raise PolicyInputRefused("policy input strings must not contain NUL")
        _check(_in_str(h, v.encode("utf-8", "surrogatepass")))
    elif t is dict:
        if depth >= MAX_INPUT_DEPTH:
            raise PolicyInputRefused(f"policy input nests deeper than {MAX_INPUT_DEPTH} levels")
        for key, item in v.items():
            if type(key) is not str or "\x00" in key:
                raise PolicyInputRefused("policy input object keys must be strings without NUL")
            _check(_in_str(h, key.encode("utf-8", "surrogatepass")))
            _add(h, item, depth + 1)
            _check(_in_item(h))
        _check(_in_object(h, len(v)))
    elif t is bool:
        _check(_in_bool(h, v))
    elif t is int:
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise PolicyInputRefused("policy input integer out of 64-bit range")
        _check(_in_int(h, v))
    elif v is None:
        _check(_in_null(h))
    elif t is list or t is tuple:
        if depth >= MAX_INPUT_DEPTH:
            raise PolicyInputRefused(f"policy input nests deeper than {MAX_INPUT_DEPTH} levels")
        for item in v:
            _add(h, item, depth + 1)
        _check(_in_array(h, len(v)))
    elif t is float:
        if v != v or v in (float("inf"), float("-inf")):
            raise PolicyInputError("policy input contains a non-finite number")
        _check(_in_float(h, v))
    else:
        raise PolicyInputError(f"policy input value of type {t.__name__} is not JSON")


def _check(code: int) -> None:
    if code != 0:
        raise PolicyInputError(f"rego-cpp rejected part of the policy input (code {code})")
