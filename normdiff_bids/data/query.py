"""A small row-selection language for tables (``--reference-query``), parsed here and never evaluated.

The grammar covers what selecting a reference needs and nothing that runs code::

    expr       := or_expr
    or_expr    := and_expr (("or" | "|") and_expr)*
    and_expr   := not_expr (("and" | "&") not_expr)*
    not_expr   := ("not" | "~") not_expr | comparison
    comparison := operand ((== | != | < | <= | > | >=) operand)*      chained: 18 <= age < 65
                | operand ["not"] "in" list
                | "(" expr ")"
    list       := "[" literal ("," literal)* [","] "]"  |  "(" literal ("," literal)* [","] ")"
    operand    := column | literal
    column     := NAME | `any name in backquotes`
    literal    := number | 'text' | "text" | True | False

``&`` and ``|`` bind like ``and`` and ``or`` (as in ``DataFrame.query``). A missing value (NaN,
``n/a``) makes every comparison and every ``in``/``not in`` false; ``not`` negates the result.
There are no function calls, attributes, ``@`` variables or arithmetic, so a query cannot run code.

One module on purpose, though near 500 lines: it is one grammar, read top to bottom (syntax tree,
tokenizer, parser, then the evaluation that gives each rule above its meaning over a table). The parts
share the tree, the keywords and the caret under the query that every error shows, and callers use only
the public functions below.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError

__all__ = ["QueryError", "parse_query", "query_mask", "select_rows"]

#: Longest query accepted, and deepest nesting of parentheses/``not``: no query needs more.
MAX_LENGTH = 10_000
MAX_DEPTH = 64

_COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")
_KEYWORDS = {"and", "or", "not", "in", "True", "False"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MISSING_TEXT = frozenset({"n/a", "N/A", "NA", "nan", "NaN", ""})


class QueryError(InputError):
    """A query that cannot be parsed or does not fit the table; the message shows where and the fix."""


@dataclass(frozen=True)
class _Token:
    kind: str  # name, number, string, bool, op, keyword, end
    value: object
    pos: int
    text: str


# -- syntax tree -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    name: str
    pos: int


@dataclass(frozen=True)
class Literal:
    value: object  # float, int, str or bool
    pos: int


@dataclass(frozen=True)
class Compare:
    operands: tuple  # Column | Literal, one more than ops
    ops: tuple  # of str


@dataclass(frozen=True)
class Membership:
    operand: Column | Literal
    values: tuple  # of Literal
    negate: bool


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    parts: tuple


@dataclass(frozen=True)
class Not:
    part: object


@dataclass(frozen=True)
class Truth:
    """A bare operand used as a condition (a true/false column)."""

    operand: Column | Literal


# -- tokenizer ---------------------------------------------------------------------------------------

def _syntax_error(text: str, pos: int, problem: str) -> QueryError:
    pointer = " " * pos + "^"
    # shown on one line, so that the caret stays under its character
    return QueryError(f"query syntax error at position {pos + 1}: {problem}\n"
                      f"    {_one_line(text)}\n    {pointer}\n"
                      f"a query compares columns with values, e.g. \"diagnosis == 'HC' and age >= 18\"; "
                      f"see 'Selecting the reference' in docs/usage.md")


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        start = i
        if ch in "'\"":
            value, i = _read_string(text, i)
            tokens.append(_Token("string", value, start, text[start:i]))
            continue
        if ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise _syntax_error(text, start, "a backquoted column name is never closed")
            if end == i + 1:
                raise _syntax_error(text, start, "empty backquoted column name")
            tokens.append(_Token("name", text[i + 1:end], start, text[start:end + 1]))
            i = end + 1
            continue
        match = _NUMBER.match(text, i)
        if match:
            i = match.end()
            if i < n and (text[i].isalnum() or text[i] == "_"):
                raise _syntax_error(text, start, f"malformed number {text[start:i + 1]!r}")
            literal = match.group()
            value = float(literal) if any(c in literal for c in ".eE") else int(literal)
            tokens.append(_Token("number", value, start, literal))
            continue
        match = _NAME.match(text, i)
        if match:
            word = match.group()
            i = match.end()
            if word in ("True", "False"):
                tokens.append(_Token("bool", word == "True", start, word))
            elif word in _KEYWORDS:
                tokens.append(_Token("keyword", word, start, word))
            else:
                tokens.append(_Token("name", word, start, word))
            continue
        two = text[i:i + 2]
        if two in ("==", "!=", "<=", ">="):
            tokens.append(_Token("op", two, start, two))
            i += 2
            continue
        if ch in "<>()[],&|~-":
            tokens.append(_Token("op", ch, start, ch))
            i += 1
            continue
        if ch == "=":
            raise _syntax_error(text, start, "a single '='; write '==' to compare")
        if ch == "@":
            raise _syntax_error(text, start, "'@' variables are not allowed; only columns and written "
                                             "values")
        if ch == ".":
            raise _syntax_error(text, start, "'.' is not allowed: no attributes or methods (write "
                                             "column names with odd characters in backquotes: `a.b`)")
        raise _syntax_error(text, start, f"unexpected character {ch!r}")
    tokens.append(_Token("end", None, n, ""))
    return tokens


def _read_string(text: str, i: int) -> tuple[str, int]:
    quote = text[i]
    out = []
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "\\" and j + 1 < len(text) and text[j + 1] in (quote, "\\"):
            out.append(text[j + 1])
            j += 2
            continue
        if ch == quote:
            return "".join(out), j + 1
        out.append(ch)
        j += 1
    raise _syntax_error(text, i, f"a text value is never closed (missing {quote})")


# -- parser ------------------------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def _advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _is(self, kind: str, *values) -> bool:
        tok = self.tok
        return tok.kind == kind and (not values or tok.value in values)

    def _fail(self, expected: str) -> QueryError:
        tok = self.tok
        found = "the end of the query" if tok.kind == "end" else repr(tok.text)
        return _syntax_error(self.text, tok.pos, f"expected {expected} but found {found}")

    def parse(self):
        if not self.text.strip():
            raise _syntax_error(self.text, 0, "the query is empty")
        node = self._or()
        if not self._is("end"):
            raise self._fail("'and', 'or' or the end of the query")
        return node

    def _nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _syntax_error(self.text, self.tok.pos, f"nested deeper than {MAX_DEPTH} levels")

    def _or(self):
        parts = [self._and()]
        while self._is("keyword", "or") or self._is("op", "|"):
            self._advance()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else BoolOp("or", tuple(parts))

    def _and(self):
        parts = [self._not()]
        while self._is("keyword", "and") or self._is("op", "&"):
            self._advance()
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def _not(self):
        if self._is("keyword", "not") or self._is("op", "~"):
            self._advance()
            self._nested()
            node = Not(self._not())
            self.depth -= 1
            return node
        return self._comparison()

    def _comparison(self):
        if self._is("op", "("):
            self._advance()
            self._nested()
            node = self._or()
            self.depth -= 1
            if not self._is("op", ")"):
                raise self._fail("')'")
            self._advance()
            return node
        first = self._operand()
        if self._is("keyword", "in") or (self._is("keyword", "not") and self._next_is_in()):
            negate = self.tok.value == "not"
            self.i += 2 if negate else 1
            return Membership(first, self._list(), negate)
        operands, ops = [first], []
        while self._is("op", *_COMPARISONS):
            ops.append(self._advance().value)
            operands.append(self._operand())
        if not ops:
            return Truth(first)
        return Compare(tuple(operands), tuple(ops))

    def _next_is_in(self) -> bool:
        nxt = self.tokens[self.i + 1]
        return nxt.kind == "keyword" and nxt.value == "in"

    def _operand(self):
        tok = self.tok
        if tok.kind == "name":
            self._advance()
            if self._is("op", "("):
                raise _syntax_error(self.text, self.tok.pos, f"'{tok.text}(' calls a function; function "
                                                             "calls are not allowed")
            return Column(tok.value, tok.pos)
        return self._literal("a column name, a number or a quoted text")

    def _literal(self, expected: str):
        tok = self.tok
        if tok.kind in ("number", "string", "bool"):
            self._advance()
            return Literal(tok.value, tok.pos)
        if tok.kind == "op" and tok.value == "-" and self.tokens[self.i + 1].kind == "number":
            self._advance()
            return Literal(-self._advance().value, tok.pos)
        raise self._fail(expected)

    def _list(self):
        if not (self._is("op", "[") or self._is("op", "(")):
            raise self._fail("a list of values after 'in', e.g. ['A', 'B']")
        close = "]" if self._advance().value == "[" else ")"
        values = []
        while True:
            if self._is("op", close) and values:
                self._advance()
                return tuple(values)
            values.append(self._literal("a number or a quoted text in the list"))
            if self._is("op", ","):
                self._advance()
            elif self._is("op", close):
                self._advance()
                return tuple(values)
            else:
                raise self._fail(f"',' or '{close}'")


def parse_query(text: str):
    """Parse ``text`` into a syntax tree; raises :class:`QueryError` with a caret under the problem."""
    if not isinstance(text, str):
        raise QueryError(f"a query must be text, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise QueryError(f"the query is {len(text)} characters long; at most {MAX_LENGTH} are accepted")
    return _Parser(text).parse()


# -- evaluation --------------------------------------------------------------------------------------

def query_mask(table: pd.DataFrame, text: str) -> np.ndarray:
    """Boolean mask [rows] of the rows of ``table`` that satisfy the query ``text``.

    Raises :class:`QueryError` for a syntax error, a column the table lacks (listing those it has) or
    a comparison of text with a number.
    """
    tree = parse_query(text)
    return _Evaluator(table, text).condition(tree)


def select_rows(table: pd.DataFrame, text: str) -> pd.DataFrame:
    """The rows of ``table`` that satisfy the query ``text`` (see :func:`query_mask`)."""
    return table[query_mask(table, text)]


class _Evaluator:
    def __init__(self, table: pd.DataFrame, text: str):
        self.table = table
        self.text = text
        self.n = len(table)

    def condition(self, node) -> np.ndarray:
        if isinstance(node, BoolOp):
            masks = [self.condition(p) for p in node.parts]
            combine = np.logical_and if node.op == "and" else np.logical_or
            out = masks[0]
            for mask in masks[1:]:
                out = combine(out, mask)
            return out
        if isinstance(node, Not):
            return ~self.condition(node.part)
        if isinstance(node, Compare):
            out = np.ones(self.n, dtype=bool)
            for left, op, right in zip(node.operands, node.ops, node.operands[1:]):
                out &= self._compare(left, op, right)
            return out
        if isinstance(node, Membership):
            return self._membership(node)
        return self._truth(node.operand)

    # operands -> (values [rows] or scalar, missing [rows] or bool, kind)
    def _value(self, node):
        if isinstance(node, Literal):
            return node.value, False, _kind_of_scalar(node.value)
        if node.name not in self.table.columns:
            raise self._unknown(node)
        column = self.table[node.name]
        kind = _kind_of_column(column)
        missing = np.array(column.isna(), dtype=bool)
        if kind == "text":
            missing |= column.astype(str).isin(_MISSING_TEXT).to_numpy() & column.notna().to_numpy()
        return column.to_numpy(), missing, kind

    def _unknown(self, node: Column) -> QueryError:
        columns = [str(c) for c in self.table.columns]
        close = difflib.get_close_matches(node.name, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return QueryError(f"query names the column {node.name!r}, which the table does not have{hint}; "
                          f"available columns: {', '.join(columns)}\n    {_one_line(self.text)}\n    "
                          f"{' ' * node.pos}^")

    def _check_kinds(self, left, lkind, right, rkind, op):
        numeric = {"number", "bool"}
        if "any" not in (lkind, rkind) and (lkind in numeric) != (rkind in numeric):
            text_side, num_side = (left, right) if lkind == "text" else (right, left)
            raise QueryError(
                f"query compares {_describe(text_side, 'text')} with {_describe(num_side, 'a number')} "
                f"({op}); compare numbers with numbers and text with quoted text, e.g. age > 18 or "
                f"sex == 'F'\n    {_one_line(self.text)}\n    {' ' * _pos(left)}^")

    def _compare(self, left, op, right) -> np.ndarray:
        lval, lmiss, lkind = self._value(left)
        rval, rmiss, rkind = self._value(right)
        self._check_kinds(left, lkind, right, rkind, op)
        missing = np.broadcast_to(np.logical_or(lmiss, rmiss), (self.n,))
        present = ~missing
        out = np.zeros(self.n, dtype=bool)
        if "any" in (lkind, rkind):
            return out
        lv = np.broadcast_to(np.asarray(lval, dtype=object), (self.n,))[present]
        rv = np.broadcast_to(np.asarray(rval, dtype=object), (self.n,))[present]
        if lkind == "text":
            lv, rv = lv.astype(str), rv.astype(str)
        else:
            lv, rv = lv.astype(float), rv.astype(float)
        out[present] = _OPERATORS[op](lv, rv)
        return out

    def _membership(self, node: Membership) -> np.ndarray:
        values, missing, kind = self._value(node.operand)
        for item in node.values:
            self._check_kinds(node.operand, kind, item, _kind_of_scalar(item.value), "in")
        missing = np.broadcast_to(missing, (self.n,))
        if kind == "any":
            return np.zeros(self.n, dtype=bool)
        values = np.broadcast_to(np.asarray(values, dtype=object), (self.n,))
        if kind == "text":
            members = pd.Series(values.astype(str)).isin([str(v.value) for v in node.values]).to_numpy()
        else:
            members = pd.Series(values.astype(float)).isin([float(v.value) for v in node.values]).to_numpy()
        members = ~members if node.negate else members
        return members & ~missing

    def _truth(self, node) -> np.ndarray:
        values, missing, kind = self._value(node)
        if kind == "any":
            return np.zeros(self.n, dtype=bool)
        if kind != "bool":
            what = f"column {node.name!r}" if isinstance(node, Column) else f"the value {node.value!r}"
            raise QueryError(f"query uses {what} as a condition, but it is not true/false; compare it, "
                             f"e.g. {_example(node)}\n    {_one_line(self.text)}\n    {' ' * _pos(node)}^")
        values = np.broadcast_to(np.asarray(values, dtype=object), (self.n,))
        missing = np.broadcast_to(missing, (self.n,))
        return np.where(missing, False, values).astype(bool)


_OPERATORS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
              ">": np.greater, ">=": np.greater_equal}


def _kind_of_scalar(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "text" if isinstance(value, str) else "number"


def _kind_of_column(column: pd.Series) -> str:
    if not column.notna().any():
        return "any"  # empty or all missing: every comparison is false, whatever it compares with
    if pd.api.types.is_bool_dtype(column):
        return "bool"
    if pd.api.types.is_numeric_dtype(column):
        return "number"
    present = column.dropna()
    if len(present) and present.map(lambda v: isinstance(v, bool | np.bool_)).all():
        return "bool"
    return "text"


def _describe(node, what: str) -> str:
    if isinstance(node, Column):
        return f"column {node.name!r} ({what})"
    return f"{node.value!r} ({what})"


def _one_line(text: str) -> str:
    return re.sub(r"\s", " ", text)


def _pos(node) -> int:
    return node.pos


def _example(node) -> str:
    name = node.name if isinstance(node, Column) else "age"
    name = name if _NAME.fullmatch(name) and name not in _KEYWORDS else f"`{name}`"
    return f"{name} == 'value' or {name} > 0"
