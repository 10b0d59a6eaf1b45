"""A bundle's simple ``$`` expressions read as data, without ``eval``.

Model Zoo configs choose values with expressions such as
``$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]``. These need no code:
the text is parsed with Python's :mod:`ast` and walked here, allowing only

* literals (numbers, strings, ``True``/``False``/``None``, a sign on a number), lists and tuples;
* ``@references`` to other config keys, resolved from the config (plain data, or another such expression);
* conditional expressions (``x if c else y``), ``and``/``or``/``not`` and comparisons of the above.

Anything else -- calls, attributes, names, subscripts, arithmetic, lambdas, comprehensions -- is
:class:`Unsafe`, and the translation refuses it as Python code needing ``--trust-bundle-code``.
Nothing is ever executed: the walk computes the value itself. Bounded: :data:`MAX_TEXT` characters,
:data:`MAX_NODES` syntax nodes, :data:`MAX_REFERENCE_DEPTH` references followed in a chain.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_NODES", "MAX_REFERENCE_DEPTH", "MAX_TEXT", "Unsafe", "evaluate"]

MAX_TEXT = 1000
MAX_NODES = 200
MAX_REFERENCE_DEPTH = 8
#: A MONAI config reference inside an expression (``@a#b#0`` or ``@a::b``).
REFERENCE = re.compile(r"@([A-Za-z0-9_]+(?:(?:#|::)[A-Za-z0-9_]+)*)")
_PLACEHOLDER = "_volseg_ref_{}_"

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_DATA = (bool, int, float, str, type(None))


_KINDS: dict[type, str] = {
    ast.BinOp: "arithmetic", ast.Subscript: "a subscript", ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension",
    ast.JoinedStr: "an f-string", ast.Dict: "a dict", ast.Set: "a set", ast.Starred: "unpacking",
    ast.NamedExpr: "an assignment", ast.Await: "await", ast.Slice: "a slice",
}


class Unsafe(ValueError):
    """The expression is not of the allowed form (the message says what is not)."""


def _plain(value: Any) -> bool:
    """True for JSON-like data (what a reference may bring into an expression)."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > 100_000:
            return False
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif not isinstance(v, _DATA):
            return False
    return True


def evaluate(text: str, resolve: Callable[[str], Any]) -> Any:
    """The value of expression ``text`` (with or without its leading ``$``).

    ``resolve(key)`` gives a referenced config key's value as plain data (it may itself call
    :func:`evaluate`, for a reference to another expression) or raises :class:`Unsafe`.
    """
    body = text[1:] if text.startswith("$") else text
    if len(body) > MAX_TEXT:
        raise Unsafe(f"is longer than {MAX_TEXT} characters")
    refs: list[str] = []

    def placeholder(m: re.Match) -> str:
        refs.append(m.group(1))
        return _PLACEHOLDER.format(len(refs) - 1)

    source = REFERENCE.sub(placeholder, body).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Unsafe("is not a Python expression this reader can parse") from None
    count = 0
    for _ in ast.walk(tree):
        count += 1
        if count > MAX_NODES:
            raise Unsafe(f"has more than {MAX_NODES} syntax nodes")
    names = {_PLACEHOLDER.format(i): r for i, r in enumerate(refs)}
    values: dict[str, Any] = {}

    def reference(name: str) -> Any:
        if name not in values:
            value = resolve(names[name])
            if not _plain(value):
                raise Unsafe(f"refers to @{names[name]}, which is not plain data")
            values[name] = value
        return values[name]

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, _DATA):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not walk(node.operand)
        if isinstance(node, ast.List):
            return [walk(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(walk(e) for e in node.elts)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
            return reference(node.id)
        if isinstance(node, ast.IfExp):
            return walk(node.body) if walk(node.test) else walk(node.orelse)
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result = True
                for v in node.values:
                    result = walk(v)
                    if not result:
                        return result
                return result
            result = False
            for v in node.values:
                result = walk(v)
                if result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = walk(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = walk(comparator)
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:
                    raise Unsafe("compares values of kinds that do not compare") from None
                left = right
            return True
        what = _KINDS.get(type(node), type(node).__name__)
        if isinstance(node, ast.Name):
            what = f"the name {node.id!r}"
        elif isinstance(node, ast.Call):
            what = "a call"
        elif isinstance(node, ast.Attribute):
            what = f"an attribute ({node.attr!r})"
        raise Unsafe(f"uses {what}")

    return walk(tree)
