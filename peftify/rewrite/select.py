"""Selectors: which sites a rule's ``match`` names.

A match is a glob on the site FQN (``*.q_proj``), ``re:<regex>`` (full match), ``role:<glob>``
(``role:mlp.*``), or a dict of any of ``name``, ``role``, ``type`` (a glob or a list of them),
``layers`` and ``where``
(a predicate over ``in_features``, ``out_features``, ``layer``, ``depth``, ``width``, parsed
into a sympy expression). All given keys must hold.
"""

from __future__ import annotations

import ast
import fnmatch
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftify.errors import SpecError, shown
from peftify.rewrite.sites import Site

SYMBOLS = ("in_features", "out_features", "layer", "depth", "width")
MATCH_KEYS = ("name", "role", "type", "layers", "where")


@dataclass(frozen=True)
class Context:
    depth: int
    width: int


Predicate = Callable[[Site, Context], bool]


def compile_match(match: Any) -> Predicate:
    """Turn a rule's ``match`` value into a predicate; raise SpecError (field 'match') if malformed."""
    if isinstance(match, str):
        if match.startswith("role:"):
            return _role(match[5:])
        return _name(match)
    if isinstance(match, dict):
        unknown = set(match) - set(MATCH_KEYS)
        if unknown:
            raise SpecError(f"unknown match key(s) {sorted(unknown, key=repr)}; use {list(MATCH_KEYS)}", field="match")
        if not match:
            raise SpecError("an empty match dict would select every site; use '*' to mean that", field="match")
        parts = []
        if "name" in match:
            parts.append(_name(_string(match["name"], "name")))
        if "role" in match:
            parts.append(_role(_string(match["role"], "role")))
        if "type" in match:
            types = match["type"] if isinstance(match["type"], list) else [match["type"]]
            types = [_string(t, "type") for t in types]
            parts.append(lambda s, c: any(fnmatch.fnmatchcase(s.module_type, t) for t in types))
        if "layers" in match:
            parts.append(_layers(match["layers"]))
        if "where" in match:
            parts.append(compile_where(match["where"]))
        return lambda s, c: all(p(s, c) for p in parts)
    raise SpecError(f"match must be a string or a dict, not {type(match).__name__}", field="match")


def uses_roles(match: Any) -> bool:
    """Whether a rule's ``match`` reads the sites' roles (which only a trace finds)."""
    return (isinstance(match, str) and match.startswith("role:")) or (isinstance(match, dict) and "role" in match)


def _string(value, field):
    if not isinstance(value, str):
        raise SpecError(f"must be a string, got {shown(value)}", field=field)
    return value


def _name(pattern: str) -> Predicate:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise SpecError(f"bad regex {pattern[3:]!r}: {e}", field="match") from e
        return lambda s, c: rx.fullmatch(s.fqn) is not None
    return lambda s, c: fnmatch.fnmatchcase(s.fqn, pattern)


def _role(pattern: str) -> Predicate:
    return lambda s, c: any(fnmatch.fnmatchcase(r, pattern) for r in s.roles)


def _layers(value) -> Predicate:
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple, str)):
        raise SpecError(f"layers must be an int, a list of ints or a range 'a-b', got {shown(value)}", field="layers")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*0*(\d{1,18})\s*(?:-\s*0*(\d{1,18})\s*)?", value)  # '2-5', or one layer '3' (no number past int64)
        if not m:
            raise SpecError(f"layers range must look like '2-5' (or '3'), got {shown(value)}", field="layers")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise SpecError(f"layers range {shown(value)} is empty: write the first layer first ('{last}-{first}')", field="layers")
        wanted = range(first, last + 1)  # tested, not listed: '0-99999999' costs nothing
    else:
        values = [value] if isinstance(value, int) else list(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise SpecError(f"layers must be integers, got {shown(value)}", field="layers")
        if any(v < 0 for v in values):
            raise SpecError(f"layers are counted from 0 (-1 is not the last layer), got {shown(value)}", field="layers")
        wanted = set(values)
    return lambda s, c: s.layer is not None and s.layer in wanted  # (None in a range scans it)


MAX_EXPONENT = 64  # a predicate is cheap to evaluate: no 2 ** 10 ** 10
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Mod: None, ast.FloorDiv: None, ast.Div: operator.truediv, ast.Pow: operator.pow}


def compile_where(text: Any) -> Predicate:
    """Parse a predicate such as ``"in_features >= 512 and in_features % 64 == 0"`` into sympy.

    Only the names in `SYMBOLS`, numbers, arithmetic, comparisons and ``and``/``or``/``not``
    are allowed; nothing is ``eval``-ed. A site without a layer index fails any predicate
    that mentions ``layer``.
    """
    import sympy

    text = _string(text, "where")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise SpecError(f"cannot parse {text!r}: {e.msg}", field="where") from e
    except (RecursionError, MemoryError) as e:
        raise SpecError(f"{text[:60]!r}… is nested too deeply to parse", field="where") from e
    symbols = {n: sympy.Symbol(n, integer=True) for n in SYMBOLS}

    def is_predicate(node) -> bool:  # a comparison, or and/or/not of them: not a bare number or name
        if isinstance(node, ast.BoolOp):
            return all(is_predicate(v) for v in node.values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return is_predicate(node.operand)
        return isinstance(node, ast.Compare)

    def value(node):  # an operand of arithmetic or of a comparison: a number, not a predicate
        if is_predicate(node):
            raise SpecError(f"{text!r}: {ast.unparse(node)!r} is true or false, not a number to compute or compare with", field="where")
        return conv(node)

    def conv(node):
        joins = isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
        if joins and not is_predicate(node):
            raise SpecError(f"{text!r}: and/or/not join comparisons (such as in_features >= 512), not {ast.unparse(node)!r}", field="where")
        if isinstance(node, ast.BoolOp):
            args = [conv(v) for v in node.values]
            return sympy.And(*args) if isinstance(node.op, ast.And) else sympy.Or(*args)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return sympy.Not(conv(node.operand))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Compare):
            parts, left = [], value(node.left)
            for op, right in zip(node.ops, node.comparators):
                if type(op) not in _COMPARE:
                    raise SpecError(f"unsupported comparison in {text!r}", field="where")
                r = value(right)
                parts.append(sympy.Rel(left, r, _COMPARE[type(op)]))
                left = r
            return sympy.And(*parts)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b.is_zero:
                raise SpecError(f"division by zero in {text!r}", field="where")
            if isinstance(node.op, ast.Pow) and not (b.is_number and abs(b) <= MAX_EXPONENT):
                raise SpecError(f"{text!r}: an exponent must be a number up to {MAX_EXPONENT}", field="where")
            if isinstance(node.op, ast.Pow) and not (a.is_number and abs(a) <= 2**64) and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.left)):
                raise SpecError(f"{text!r}: a power of a power ({ast.unparse(node)!r}) grows without bound; write one exponent", field="where")
            if isinstance(node.op, ast.Mod):
                return sympy.Mod(a, b)
            if isinstance(node.op, ast.FloorDiv):
                return sympy.floor(a / b)
            return _ARITH[type(node.op)](a, b)
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise SpecError(f"unknown name {node.id!r} in {text!r}; use {list(SYMBOLS)}", field="where")
            return symbols[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return sympy.sympify(node.value)
        raise SpecError(f"unsupported expression {ast.unparse(node)!r} in {text!r}", field="where")

    try:
        expr = conv(tree)
    except SpecError:
        raise
    except (RecursionError, MemoryError) as e:
        raise SpecError(f"{text[:60]!r}… is nested too deeply", field="where") from e
    except (TypeError, ValueError, ArithmeticError) as e:  # sympy's refusals, such as a comparison with NaN (1e400 - 1e400)
        raise SpecError(f"{text!r} cannot be used: {e}", field="where") from e
    if not is_predicate(tree):
        raise SpecError(f"{text!r} is not a true/false predicate", field="where")
    used = sorted(str(s) for s in expr.free_symbols)
    # one sympy substitution per distinct set of values (~0.3 ms each; sites share shapes): a
    # plan evaluated every rule at every site, 4 s for 100 rules over a 32-layer Llama
    found: dict[tuple, bool] = {}

    def predicate(site: Site, ctx: Context) -> bool:
        values = {"in_features": site.in_features, "out_features": site.out_features, "layer": site.layer, "depth": ctx.depth, "width": ctx.width}
        key = tuple(values[n] for n in used)
        if None in key:
            return False
        if key not in found:
            try:
                found[key] = bool(expr.subs({symbols[n]: values[n] for n in used}))
            except (TypeError, ValueError, ArithmeticError, RecursionError) as e:  # e.g. a division by a size that is 0 here
                raise SpecError(f"{text!r} cannot be evaluated for {site.fqn} ({e})", field="where") from e
        return found[key]

    return predicate
