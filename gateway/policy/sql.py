"""SQL facts for the policy: which tables and functions a query reads, from a real SQL parser.

The policy never reads SQL text. The gateway parses the ``sql`` argument of a tool call with
sqlglot, once per dialect the database server may run (SQLite and PostgreSQL), and hands the
policy ``input.mcp.facts.sql``::

    {"understood": bool, "tables": [...], "functions": [...]}

``understood`` is true only for exactly one read-only query (SELECT, WITH ... SELECT, UNION /
INTERSECT / EXCEPT of selects, VALUES) that both dialects parse; ``tables`` is every table the
query may read (lower-case; ``schema.table`` when qualified, so ``main.employees`` never passes for
``employees``), CTE names excluded where they certainly shadow a table and their bodies included;
``functions`` every function the text calls (lower-case, as written). Where the two dialects read
the text differently the union is taken: the sets may hold more than the engine reads, never less.

The database server calls :func:`analyze` on the same text and makes the engine enforce the
result (SQLite authorizer, PostgreSQL plan check), so the policy and the engine cannot disagree.

Work is bounded before it grows with the input: the text length and parenthesis depth are
checked before parsing (the parser is recursive), the tree size and the number of table
references after it; going over any bound raises :class:`~gateway.errors.InputLimitExceeded`
naming the bound. The shape of the facts is documented in ``policies/README.md``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlglot
import sqlglot.errors
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.tokenizer_core import Token, TokenType

from gateway.errors import InputLimitExceeded

# Bounds (README.md, "SQL facts"). Tokenizing costs ~3 us per character and parsing ~10 us per
# token per dialect (pure Python): the length cap bounds the tokenizer, the token cap the parser,
# so the worst text costs tens of milliseconds, not seconds (figures in tests/gateway/policy/
# test_sql.py). A hand-written report query is a few hundred tokens.
MAX_SQL_LENGTH = 8_000
MAX_SQL_TOKENS = 1_000
# sqlglot descends ~20 Python frames per parenthesis; 32 levels stay far below the interpreter's
# recursion limit from any caller, and no hand-written query nests that deep.
MAX_SQL_NESTING = 32
MAX_TABLE_REFERENCES = 64
MAX_SQL_NODES = 10_000

DIALECTS = ("sqlite", "postgres")

# The functions a query may call; policies/data.json (gateway.sql_functions) holds the same list
# (a test keeps the two equal) and the database server lets the engine call only these. Plain
# aggregates, string, number and date functions: nothing that reads files, loads code, returns
# pointers (fts3_tokenizer), reveals the engine (sqlite_*, pg_*) or reads other tables
# (query_to_xml). like/glob are what SQLite calls for the LIKE and GLOB operators.
SQL_FUNCTIONS: frozenset[str] = frozenset({
    # aggregates
    "avg", "count", "group_concat", "max", "min", "string_agg", "sum", "total",
    # window
    "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead",
    "first_value", "last_value", "nth_value",
    # strings
    "char", "concat", "concat_ws", "format", "glob", "hex", "instr", "length", "like", "lower",
    "ltrim", "printf", "replace", "rtrim", "substr", "substring", "trim", "unicode", "upper",
    "left", "right", "lpad", "rpad", "position", "strpos", "reverse", "initcap", "split_part",
    "octet_length", "char_length", "character_length",
    # numbers
    "abs", "ceil", "ceiling", "floor", "mod", "power", "pow", "round", "sign", "sqrt", "trunc",
    "exp", "ln", "log", "log10", "greatest", "least", "random",
    # null handling and conditionals
    "coalesce", "ifnull", "iif", "nullif",
    # dates and times
    "current_date", "current_time", "current_timestamp", "date", "datetime", "julianday",
    "strftime", "time", "unixepoch", "date_trunc", "date_part", "extract", "now", "to_char",
    "age", "make_date",
    # types
    "cast", "typeof",
})

# Characters neither engine reads as the parser does (NUL, controls other than tab/newline/CR,
# Unicode spaces and format characters such as zero-width joiners and BOMs): refused anywhere.
_BAD_CHARS = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f"
    "\u205f-\u206f\u3000\ufeff\ufff9-\ufffb\ud800-\udfff]")
_BRACKETS = re.compile(r"[()\[\]]")
# A name both engines read the same way once lower-cased: ASCII only, no dots (a dot inside a
# quoted name would read as a schema qualifier here).
_CANONICAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_QUOTES = "\"`[]"

# Statements and clauses that are not a plain read, wherever they occur in the tree (a
# data-modifying CTE, SELECT ... INTO, SELECT ... FOR UPDATE, a command sqlglot did not parse).
_NOT_READ_ONLY: tuple[type[exp.Expr], ...] = tuple(
    cls for cls in (getattr(exp, name, None) for name in (
        "DML", "DDL", "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "Command",
        "Into", "Lock", "Pragma", "Attach", "Detach", "Set", "Use", "Transaction", "Commit",
        "Rollback", "Copy", "Grant", "Revoke", "TruncateTable", "Analyze", "Describe", "LoadData",
        "Cache", "Uncache", "Refresh", "Kill", "Export", "Install"))
    if isinstance(cls, type))
_QUERY_ROOTS = (exp.Select, exp.SetOperation, exp.Values)


class _NotUnderstood(Exception):
    """The text is not one read-only query both dialects parse (becomes ``understood: false``)."""


@dataclass(frozen=True, slots=True)
class SqlFacts:
    """What one SQL text reads; ``tables``/``functions`` are empty when not ``understood``."""

    understood: bool
    tables: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    problem: str = ""
    # The CTE names the text defines (for the database server, not the policy).
    ctes: frozenset[str] = frozenset()

    def as_input(self) -> dict[str, Any]:
        """The policy input form (``input.mcp.facts.sql``): sorted lists, no ``problem``."""
        return {"understood": self.understood, "tables": sorted(self.tables),
                "functions": sorted(self.functions)}


_NOT_A_STRING = SqlFacts(False, problem="the SQL is not a string")


def sql_facts(sql: Any) -> dict[str, Any]:
    """The facts of one SQL text (``input.mcp.facts.sql``); raises InputLimitExceeded."""
    if type(sql) is not str:
        return _NOT_A_STRING.as_input()
    return analyze(sql).as_input()


def analyze(sql: str) -> SqlFacts:
    """The facts of ``sql`` for every dialect in :data:`DIALECTS` (union of what they read).

    Raises :class:`InputLimitExceeded` when the text is over a bound; every other refusal is
    ``SqlFacts(understood=False, problem=...)``.
    """
    if len(sql) > MAX_SQL_LENGTH:
        raise _limit("sql_length", MAX_SQL_LENGTH, f"the SQL text is over {MAX_SQL_LENGTH} characters")
    return _analyze(sql)


@functools.lru_cache(maxsize=128)
def _analyze(sql: str) -> SqlFacts:
    bad = _BAD_CHARS.search(sql)
    if bad is not None:
        return SqlFacts(False, problem=f"character U+{ord(bad.group()):04X} is not allowed in SQL")
    _check_nesting(sql)
    tables: set[str] = set()
    functions: set[str] = set()
    ctes: set[str] = set()
    try:
        for dialect in DIALECTS:
            found_tables, found_functions, found_ctes = _read(sql, dialect)
            tables |= found_tables
            functions |= found_functions
            ctes |= found_ctes
    except _NotUnderstood as err:
        return SqlFacts(False, problem=str(err))
    return SqlFacts(True, frozenset(tables), frozenset(functions), ctes=frozenset(ctes))


def _limit(name: str, bound: int, message: str) -> InputLimitExceeded:
    return InputLimitExceeded(message, data={"limit": name, "max": bound})


def _check_nesting(sql: str) -> None:
    # Brackets inside literals count too: a bound on the text, not on the query.
    depth = 0
    for m in _BRACKETS.finditer(sql):
        if m.group() in "([":
            depth += 1
            if depth > MAX_SQL_NESTING:
                raise _limit("sql_nesting", MAX_SQL_NESTING,
                             f"the SQL nests brackets deeper than {MAX_SQL_NESTING}")
        else:
            depth -= 1


def _read(sql: str, dialect_name: str) -> tuple[set[str], set[str], set[str]]:
    dialect = Dialect.get_or_raise(dialect_name)
    try:
        tokens = dialect.tokenize(sql)
        if len(tokens) > MAX_SQL_TOKENS:
            raise _limit("sql_tokens", MAX_SQL_TOKENS, f"the SQL has more than {MAX_SQL_TOKENS} tokens")
        statements = [s for s in dialect.parser().parse(tokens, sql) if s is not None]
    except RecursionError:
        # Nesting without brackets (NOT NOT ..., - - ...): the same bound, reached another way.
        raise _limit("sql_nesting", MAX_SQL_NESTING, "the SQL nests expressions too deeply") from None
    except (sqlglot.errors.SqlglotError, ValueError, KeyError, IndexError, TypeError,
            AttributeError) as err:
        # (sqlglot raises its own errors for bad SQL; the others are its failures on odd input,
        # which must refuse the query, not fail the request.)
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _NotUnderstood(f"syntax error (as {dialect_name}: {first_line})") from None
    if len(statements) != 1:
        raise _NotUnderstood("exactly one statement is allowed per call")
    root = statements[0]
    if not isinstance(root, _QUERY_ROOTS):
        raise _NotUnderstood(f"not a read-only query ({root.key} as {dialect_name}): only SELECT, "
                             f"WITH ... SELECT and VALUES are allowed")
    nodes = _nodes(root)
    tables: set[str] = set()
    functions: set[str] = set()
    ctes: set[str] = set()
    references = 0
    for node in nodes:
        if isinstance(node, exp.CTE):
            ctes.add(_cte_name(node))
        if isinstance(node, _NOT_READ_ONLY):
            raise _NotUnderstood(f"not a read-only query ({node.key} as {dialect_name})")
        if isinstance(node, exp.Lateral) and not isinstance(node.this, (exp.Subquery, exp.Query, exp.Func)):
            # "JOIN LATERAL name": SQLite reads a table called "lateral" aliased as name, a
            # reading this parse does not show: refuse rather than name fewer tables.
            raise _NotUnderstood(f"LATERAL without a subquery or function ({dialect_name})")
        if isinstance(node, exp.Table):
            name = _table_name(node)
        elif isinstance(node, exp.In) and isinstance(node.args.get("field"), exp.Column):
            # SQLite's "x IN table": a table read that sqlglot shows as a column.
            name = _in_table_name(node.args["field"])
        else:
            if isinstance(node, exp.Func):
                called = _function_name(node, sql)
                if called is not None:
                    functions.add(called)
            continue
        if name is None:
            continue
        references += 1
        if references > MAX_TABLE_REFERENCES:
            raise _limit("sql_table_references", MAX_TABLE_REFERENCES,
                         f"the SQL refers to tables more than {MAX_TABLE_REFERENCES} times")
        if "." in name or not _is_cte_reference(node, name):
            tables.add(name)
    functions |= _keyword_functions(tokens, dialect)
    return tables, functions, ctes


def _nodes(root: exp.Expr) -> list[exp.Expr]:
    nodes: list[exp.Expr] = []
    for node in root.walk():
        nodes.append(node)
        if len(nodes) > MAX_SQL_NODES:
            raise _limit("sql_nodes", MAX_SQL_NODES, f"the SQL has more than {MAX_SQL_NODES} parts")
    return nodes


def _canonical(identifier: exp.Expr | str | None) -> str:
    """The lower-case name of an identifier both engines resolve alike, or _NotUnderstood.

    A quoted name is case-sensitive in PostgreSQL and not in SQLite, so one with upper-case
    letters could name different tables in the two: refused, as are non-ASCII names (SQLite
    folds ASCII only).
    """
    if isinstance(identifier, exp.Identifier):
        text, quoted = identifier.this, bool(identifier.args.get("quoted"))
    elif isinstance(identifier, str):
        text, quoted = identifier, False
    else:
        raise _NotUnderstood(f"unsupported name {identifier!r:.40}")
    if not isinstance(text, str) or not _CANONICAL_NAME.match(text):
        raise _NotUnderstood(f"name {str(text)!r:.60} is not a plain ASCII identifier")
    lowered = text.translate(_ASCII_LOWER)
    if quoted and lowered != text:
        raise _NotUnderstood(f"quoted name {text!r} has upper-case letters")
    return lowered


def _table_name(table: exp.Table) -> str | None:
    """``name`` or ``schema.name`` (``catalog.schema.name``); None for a table-valued function."""
    this = table.this
    if not isinstance(this, exp.Identifier):
        if this is None or isinstance(this, exp.Func):
            return None  # ROWS FROM (...) / f(...): their functions are collected as calls
        raise _NotUnderstood(f"unsupported table expression {this.key}")
    parts = [table.args.get("catalog"), table.args.get("db"), this]
    return ".".join(_canonical(p) for p in parts if p is not None and p != "")


def _in_table_name(column: exp.Column) -> str:
    parts = [column.args.get("catalog"), column.args.get("db"), column.args.get("table"), column.this]
    return ".".join(_canonical(p) for p in parts if p is not None and p != "")


def _is_cte_reference(node: exp.Expr, name: str) -> bool:
    """Whether an unqualified ``name`` at ``node`` certainly names a CTE, not a table.

    The nearest enclosing WITH that defines ``name`` decides. Inside a CTE body, only an earlier
    sibling counts: a CTE's own name is a table in PostgreSQL without RECURSIVE and a recursion
    in SQLite, and a later sibling is a table in PostgreSQL; either way the table is kept.
    """
    child: exp.Expr = node
    parent = node.parent
    while parent is not None:
        with_ = parent.args.get("with_") or parent.args.get("with")
        if isinstance(with_, exp.With) and child is not with_:
            if any(_cte_name(cte) == name for cte in with_.expressions):
                return True
        if isinstance(parent, exp.With):
            ctes = parent.expressions
            if isinstance(child, exp.CTE) and child in ctes:
                index = next(i for i, cte in enumerate(ctes) if cte is child)
                if any(_cte_name(cte) == name for cte in ctes[:index]):
                    return True
                if parent.args.get("recursive") and _cte_name(child) == name:
                    return True
                # Skip the query owning this WITH: its other CTEs do not cover this body.
                owner = parent.parent
                child = owner if owner is not None else parent
                parent = child.parent
                continue
        child, parent = parent, parent.parent
    return False


def _cte_name(cte: exp.Expr) -> str:
    alias = cte.args.get("alias")
    identifier = alias.this if isinstance(alias, exp.TableAlias) else None
    return _canonical(identifier)


def _function_name(func: exp.Func, sql: str) -> str | None:
    """The name of a called function as written, or None for syntax sqlglot models as a function.

    A call parsed from ``name(...)`` carries the position of its name token. Nodes without one
    are operators and keywords (AND, CASE, EXISTS, ->) or parts sqlglot builds inside a call;
    calls with their own syntax (CAST, TRIM, EXTRACT, ...) are found in the tokens instead.
    """
    start, end = func.meta.get("start"), func.meta.get("end")
    if isinstance(start, int) and isinstance(end, int):
        written = sql[start:end + 1]
        if len(written) >= 2 and written[0] in _QUOTES and written[-1] in _QUOTES:
            return _canonical(exp.Identifier(this=written[1:-1], quoted=True))
        return _canonical(written)
    if isinstance(func, exp.Anonymous):
        return _canonical(func.this if isinstance(func.this, exp.Identifier) else str(func.this))
    return None


def _keyword_functions(tokens: Iterable[Token], dialect: Dialect) -> set[str]:
    """Calls the parser turns into special nodes without a name position (CAST(...),
    TRIM(...)) and functions written without parentheses (CURRENT_DATE)."""
    parsers = dialect.parser_class.FUNCTION_PARSERS
    no_paren = dialect.parser_class.NO_PAREN_FUNCTIONS
    found: set[str] = set()
    previous: Token | None = None
    for token in _with_end(tokens):
        if previous is not None:
            if token is not None and token.token_type == TokenType.L_PAREN \
                    and previous.text.upper() in parsers:
                found.add(previous.text.translate(_ASCII_LOWER))
            elif previous.token_type in no_paren:
                found.add(previous.text.translate(_ASCII_LOWER))
        previous = token
    return found


def _with_end(tokens: Iterable[Token]) -> Iterator[Token | None]:
    yield from tokens
    yield None
