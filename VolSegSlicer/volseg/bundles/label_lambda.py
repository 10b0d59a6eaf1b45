"""Reading one common form of a bundle's ``Lambdad`` without running it: channels to label values.

BraTS-style bundles turn thresholded sigmoid channels into one label map with a lambda such as::

    $lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))

i.e. "channel 2 gives 4, else channel 0 gives 1, else channel 1 gives 2, else 0". This module
parses the text with :mod:`ast` (nothing is compiled or evaluated) and accepts only that exact
shape: nested ``torch.where(x[[C]] > 0, V, ...)`` ending in ``0``. Anything else is None.
"""

from __future__ import annotations

import ast


def _channel_test(node: ast.AST, arg: str) -> int | None:
    """``x[[C]] > 0`` (or ``x[C] > 0``) -> C."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Gt)
            and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value == 0):
        return None
    sub = node.left
    if not (isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name) and sub.value.id == arg):
        return None
    index = sub.slice
    if isinstance(index, ast.List) and len(index.elts) == 1:
        index = index.elts[0]
    if isinstance(index, ast.Constant) and type(index.value) is int and index.value >= 0:
        return index.value
    return None


def _is_torch_where(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "where"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and len(node.args) == 3 and not node.keywords)


def channel_labels(text: str) -> list[tuple[int, int]] | None:
    """``[(channel, value), ...]`` in priority order (first wins) for the lambda form above, else None."""
    source = text.strip()
    if source.startswith("$"):
        source = source[1:]
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None
    fn = tree.body
    if not (isinstance(fn, ast.Lambda) and len(fn.args.args) == 1 and not fn.args.vararg and not fn.args.kwarg):
        return None
    arg = fn.args.args[0].arg
    pairs: list[tuple[int, int]] = []
    node = fn.body
    while _is_torch_where(node):
        channel = _channel_test(node.args[0], arg)
        value = node.args[1]
        if channel is None or not (isinstance(value, ast.Constant) and type(value.value) is int and value.value > 0):
            return None
        pairs.append((channel, value.value))
        node = node.args[2]
    if not pairs or not (isinstance(node, ast.Constant) and node.value == 0 and type(node.value) is int):
        return None
    return pairs
