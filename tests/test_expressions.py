"""The safe expression parser of config profiles: arithmetic of the coordinates, nothing else."""

import numpy as np
import pytest

from vcnn.expressions import ExpressionError, compile_expression

X = np.array([[0.0, 0.5, 1.0], [0.1, 0.2, 0.41], [0.0, 1.0, 2.0]])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4 * y * (0.41 - y) / 0.41**2", 4 * X[1] * (0.41 - X[1]) / 0.41**2),
        ("1.5 * x[1] * (0.41 - x[1])", 1.5 * X[1] * (0.41 - X[1])),
        ("-x + +z", -X[0] + X[2]),
        ("sin(pi * x) + cos(e * y) - exp(-z)", np.sin(np.pi * X[0]) + np.cos(np.e * X[1]) - np.exp(-X[2])),
        ("sqrt(abs(x - 1)) * tanh(y)", np.sqrt(np.abs(X[0] - 1)) * np.tanh(X[1])),
        ("maximum(x, 0.5) ** 2", np.maximum(X[0], 0.5) ** 2),
        ("2", np.full(3, 2.0)),
    ],
)
def test_arithmetic_of_the_coordinates(text, expected):
    value = compile_expression(text)(X)
    assert value.shape == (3,) and value.dtype == np.float64
    np.testing.assert_allclose(value, expected, rtol=1e-14)


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('touch pwned')", "attribute access"),
        ("__import__('os')", "calling anything"),
        ("x.__class__", "attribute"),
        ("np.sin(x)", "attribute"),
        ("open('/etc/passwd')", "calling anything"),
        ("eval('1')", "calling anything"),
        ("(lambda: 1)()", "calling anything"),
        ("[c for c in ()]", "ListComp"),
        ("x[3]", "subscript"),
        ("y[0]", "subscript"),
        ("x[0:2]", "subscript"),
        ("'text'", "constant"),
        ("True", "constant"),
        ("x < 1", "Compare"),
        ("sin(x, y)", "takes 1 argument"),
        ("sin(x=1)", "keyword"),
        ("alpha * x", "name 'alpha'"),
        ("x +", "not a valid expression"),
        ("x; import os", "not a valid expression"),
        ("x" + "+x" * 1500, "longer than"),
        ("(" * 60 + "x" + ")" * 60 + "+" + "-" * 60 + "x", "deeper"),
    ],
)
def test_everything_else_is_refused(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExpressionError, match=message):
        compile_expression(text, where="inlet 'inlet'")
    assert not (tmp_path / "pwned").exists()


def test_large_powers_are_floats_not_huge_integers():
    # 9 ** 9 ** 9 as Python integers would take minutes and gigabytes; as float64 it is inf.
    value = compile_expression("9 ** 9 ** 9 + x")(X)
    assert np.all(np.isinf(value))


def test_messages_name_where_the_expression_is():
    with pytest.raises(ExpressionError, match=r"^\[generate\.boundaries\.inlets\.in\]"):
        compile_expression("os.getcwd()", where="[generate.boundaries.inlets.in]")
