"""Safe arithmetic expressions of the coordinates, for profiles given in config files.

A config file is data: an expression in it must never run code. :func:`compile_expression`
parses the text with :mod:`ast` and accepts only a whitelist of node types, walking the tree
itself to evaluate it (``eval`` and ``exec`` are never called):

* numbers (``1``, ``2.5e-3``), the named constants ``pi`` and ``e``;
* the coordinates ``x``, ``y``, ``z`` and, as in older configs, ``x[0]``, ``x[1]``, ``x[2]``;
* ``+ - * / **`` and unary ``-``/``+``, parentheses;
* calls of the functions in :data:`FUNCTIONS` (``sin(x)``, ``sqrt(y)``, ``minimum(a, b)``),
  by bare name, with positional arguments.

Nothing else: no attribute access (``np.sin``, ``x.__class__``), no other names or subscripts,
no keywords, comparisons, strings, lambdas or comprehensions. Values are float64 numpy arrays,
so a large power gives inf instead of a huge Python integer.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["CONSTANTS", "FUNCTIONS", "ExpressionError", "compile_expression"]

#: Longest accepted expression (characters) and deepest accepted tree: bounds parse work.
MAX_LENGTH = 2000
MAX_DEPTH = 50

#: Named constants.
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

#: Whitelisted numpy functions by name, with their number of arguments.
FUNCTIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "sin": (np.sin, 1),
    "cos": (np.cos, 1),
    "tan": (np.tan, 1),
    "arcsin": (np.arcsin, 1),
    "arccos": (np.arccos, 1),
    "arctan": (np.arctan, 1),
    "sinh": (np.sinh, 1),
    "cosh": (np.cosh, 1),
    "tanh": (np.tanh, 1),
    "exp": (np.exp, 1),
    "log": (np.log, 1),
    "sqrt": (np.sqrt, 1),
    "abs": (np.abs, 1),
    "minimum": (np.minimum, 2),
    "maximum": (np.maximum, 2),
    "arctan2": (np.arctan2, 2),
}

_COORDINATES = ("x", "y", "z")
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

#: An evaluator: coordinates (3, M) float64 -> values.
_Node = Callable[[np.ndarray], Any]


class ExpressionError(ValueError):
    """An expression is not valid or uses something outside the whitelist."""


def compile_expression(text: str, *, where: str = "expression") -> Callable[[np.ndarray], np.ndarray]:
    """Parse an arithmetic expression of the coordinates into a function.

    Args:
        text: e.g. ``"4 * y * (0.41 - y) / 0.41**2"`` or ``"1.5 * sin(pi * x[1])"``.
        where: what the expression is (named in error messages), e.g. ``"inlet 'inlet'"``.

    Returns:
        ``f(x)`` with ``x`` the (3, M) float64 coordinates, returning (M,) float64 values.

    Raises:
        ExpressionError: naming ``where`` and the offending part, for anything outside the
            whitelist of the module docstring or text that is not an expression.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"{where}: an expression must be a string, got {text!r}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"{where}: expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"{where}: {text!r} is not a valid expression ({error.msg})") from None
    node = _build(tree.body, text=text, where=where, depth=0)

    def evaluate(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            value = np.asarray(node(x), dtype=np.float64)
        return np.broadcast_to(value, x.shape[1:]).copy()

    return evaluate


def _build(node: ast.AST, *, text: str, where: str, depth: int) -> _Node:
    """Check one node against the whitelist and return its evaluator."""
    if depth > MAX_DEPTH:
        raise ExpressionError(f"{where}: expression nested deeper than {MAX_DEPTH} levels")

    def refuse(what: str) -> ExpressionError:
        part = ast.get_source_segment(text, node) or type(node).__name__
        return ExpressionError(
            f"{where}: {what} is not allowed in an expression ({part!r}); use numbers, "
            f"x, y, z, x[0..2], {', '.join(CONSTANTS)}, + - * / ** and "
            f"{', '.join(FUNCTIONS)}"
        )

    def sub(child: ast.AST) -> _Node:
        return _build(child, text=text, where=where, depth=depth + 1)

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise refuse(f"the constant {node.value!r}")
        value = np.float64(node.value)
        return lambda x: value
    if isinstance(node, ast.Name):
        if node.id in _COORDINATES:
            axis = _COORDINATES.index(node.id)
            return lambda x: x[axis]
        if node.id in CONSTANTS:
            value = np.float64(CONSTANTS[node.id])
            return lambda x: value
        raise refuse(f"the name {node.id!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        function = _BINARY[type(node.op)]
        left, right = sub(node.left), sub(node.right)
        return lambda x: function(left(x), right(x))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        function = _UNARY[type(node.op)]
        operand = sub(node.operand)
        return lambda x: function(operand(x))
    if isinstance(node, ast.Subscript):
        index = node.slice
        if (
            isinstance(node.value, ast.Name)
            and node.value.id == "x"
            and isinstance(index, ast.Constant)
            and type(index.value) is int
            and 0 <= index.value <= 2
        ):
            axis = index.value
            return lambda x: x[axis]
        raise refuse("a subscript other than x[0], x[1], x[2]")
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            raise refuse("attribute access (write sin(x), not np.sin(x))")
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise refuse("calling anything but the whitelisted functions")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise refuse("keyword or starred arguments")
        function, arity = FUNCTIONS[node.func.id]
        if len(node.args) != arity:
            raise ExpressionError(
                f"{where}: {node.func.id}() takes {arity} argument(s), got {len(node.args)}"
            )
        arguments = [sub(a) for a in node.args]
        return lambda x: function(*(a(x) for a in arguments))
    if isinstance(node, ast.Attribute):
        raise refuse("attribute access")
    raise refuse(type(node).__name__)
