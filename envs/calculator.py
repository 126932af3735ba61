"""A calculator a model may call with any text: arithmetic parsed into a Python AST and evaluated
over an allow-list (numbers, + - * / // % **, unary +/-, parentheses), never `eval`. Length,
exponents and every intermediate magnitude are bounded, so no input can hang or exhaust the
trainer; anything else is a `CalcError` whose message is the tool's answer to the model.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from typing import Callable, Union

Number = Union[int, float]

BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


ERROR = "error: "  # how every refusal starts


class CalcError(ValueError):
    """Input the calculator refuses; str(error) is what the model reads back."""


class Calculator:
    def __init__(self, max_chars: int = 64, max_exponent: int = 16, max_magnitude: float = 1e15):
        self.max_chars, self.max_exponent, self.max_magnitude = max_chars, max_exponent, max_magnitude

    def __call__(self, expression: str) -> str:
        """The value of `expression` as text (an integral value without a decimal point)."""
        expression = expression.strip()
        if not expression:
            raise CalcError(ERROR + "empty expression")
        if len(expression) > self.max_chars:
            raise CalcError(f"{ERROR}expression longer than {self.max_chars} characters")
        try:
            with warnings.catch_warnings():  # "1if" etc. warn on stderr before they fail: the model's text, not ours
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            raise CalcError(ERROR + "not an arithmetic expression") from None
        value = self._eval(tree.body)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value) if isinstance(value, int) else f"{value:.10g}"

    def _eval(self, node: ast.AST) -> Number:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self._bounded(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            return UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > self.max_exponent:
                raise CalcError(f"{ERROR}exponent above {self.max_exponent}")
            try:
                return self._bounded(BINARY[type(node.op)](left, right))
            except ZeroDivisionError:
                raise CalcError(ERROR + "division by zero") from None
            except OverflowError:
                raise CalcError(f"{ERROR}magnitude above {self.max_magnitude:g}") from None
        raise CalcError(ERROR + "only numbers, + - * / // % ** and parentheses")

    def _bounded(self, value: Number) -> Number:
        if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)) \
                or abs(value) > self.max_magnitude:
            raise CalcError(f"{ERROR}magnitude above {self.max_magnitude:g}")
        return value
