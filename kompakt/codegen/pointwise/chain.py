"""An onnx-independent description of a chain of elementwise ops (what one kernel computes).

Values are numbered: ``0 .. len(inputs)-1`` are the inputs, then one value per step in order. A
step's ``args`` may only name values before it, so a chain is a DAG in topological order and
``outputs`` name any values (an input named as an output is copied through).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kompakt.errors import CodegenError

ROLES = ("full", "row", "scalar")
"""How an input broadcasts against the output: same shape, shape ``[D]`` along the last dim, or
one element."""

DTYPES = ("fp32", "fp16", "bf16")
"""Storage dtypes of inputs and outputs; arithmetic is always fp32. (bf16 is not checked by the
CPU tests: Triton's interpreter computes bf16 wrongly.)"""

# op -> (min args, max args or None for variadic, allowed attrs)
_UNARY = ("Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Tanh", "Sigmoid", "Relu", "Erf")
_BINARY = ("Add", "Sub", "Mul", "Div")
_ARITY: dict[str, tuple[int, int | None, tuple[str, ...]]] = {
    **{op: (2, 2, ()) for op in _BINARY},
    **{op: (1, 1, ()) for op in _UNARY},
    "Gelu": (1, 1, ("approximate",)),
    # One arg with a constant ``exponent`` attr (specialised: x*x, sqrt, ...), or two args.
    "Pow": (1, 2, ("exponent",)),
    "Min": (1, None, ()),
    "Max": (1, None, ()),
    "Where": (3, 3, ()),  # (condition, then, else); a condition is true where it is nonzero
    "Cast": (1, 1, ("to",)),
    "Clip": (1, 1, ("min", "max")),  # either bound may be absent
    "Constant": (0, 0, ("value",)),  # an fp32 scalar literal (ONNX scalar constants)
}
POINTWISE_OPS: tuple[str, ...] = tuple(sorted(_ARITY))
"""Every op a `Step` may use."""

CAST_TARGETS = ("fp32", "fp16")


@dataclass(frozen=True)
class Operand:
    """One kernel input and how it broadcasts (`ROLES`)."""

    role: str = "full"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise CodegenError(f"operand role '{self.role}' is not one of {', '.join(ROLES)}")


@dataclass(frozen=True)
class Step:
    """``op(*values[args], **attrs)``. Attrs are kept as a sorted tuple of pairs so equal steps
    compare and hash equal whatever order they were given in."""

    op: str
    args: tuple[int, ...]
    attrs: tuple[tuple[str, object], ...] | Mapping[str, object] = field(default=())

    def __post_init__(self) -> None:
        items = self.attrs.items() if isinstance(self.attrs, Mapping) else self.attrs
        object.__setattr__(self, "args", tuple(int(a) for a in self.args))
        object.__setattr__(self, "attrs", tuple(sorted((str(k), _number(v)) for k, v in items)))

    def attr(self, name: str, default: object = None) -> object:
        return dict(self.attrs).get(name, default)


@dataclass(frozen=True)
class Chain:
    """A DAG of elementwise steps over broadcast inputs; see the module docstring."""

    inputs: tuple[Operand, ...]
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "outputs", tuple(int(o) for o in self.outputs))
        self._validate()

    @property
    def num_values(self) -> int:
        return len(self.inputs) + len(self.steps)

    def _validate(self) -> None:
        if not any(o.role == "full" for o in self.inputs):
            raise CodegenError("a chain needs at least one 'full' input: it sets the output shape")
        if not self.outputs:
            raise CodegenError("a chain needs at least one output")
        for i, step in enumerate(self.steps):
            where = f"step {i} ({step.op})"
            if step.op not in _ARITY:
                known = ", ".join(POINTWISE_OPS)
                raise CodegenError(f"{where}: unknown op; supported: {known}")
            low, high, allowed = _ARITY[step.op]
            if len(step.args) < low or (high is not None and len(step.args) > high):
                raise CodegenError(f"{where}: takes {low}..{high or 'n'} args, got {step.args}")
            for a in step.args:
                if not 0 <= a < len(self.inputs) + i:
                    raise CodegenError(f"{where}: arg {a} is not an input or an earlier step")
            for name, _ in step.attrs:
                if name not in allowed:
                    raise CodegenError(f"{where}: unexpected attr '{name}'")
            _check_attrs(where, step)
        for o in self.outputs:
            if not 0 <= o < self.num_values:
                raise CodegenError(f"output {o} is not a value of the chain")

    def out_dtypes(self, dtype_in: str) -> tuple[str, ...]:
        """Each output's storage dtype: a `Cast` sets it, other ops keep their first typed arg's
        (`Where`: its ``then`` arg's); constants are untyped."""
        dtypes: list[str | None] = [dtype_in] * len(self.inputs)
        for step in self.steps:
            if step.op == "Cast":
                dtypes.append(str(step.attr("to")))
                continue
            args = step.args[1:] if step.op == "Where" else step.args[:1]
            dtypes.append(next((dtypes[a] for a in args if dtypes[a] is not None), None))
        return tuple(dtypes[o] or dtype_in for o in self.outputs)

    def used_values(self) -> set[int]:
        """Values the outputs depend on (dead steps are not rendered; unused inputs not read)."""
        live, todo = set(), list(self.outputs)
        while todo:
            v = todo.pop()
            if v in live:
                continue
            live.add(v)
            if v >= len(self.inputs):
                todo.extend(self.steps[v - len(self.inputs)].args)
        return live

    def describe(self) -> str:
        """One line per chain, e.g. ``Mul(x0, x1) -> t0; Gelu[approximate=none](t0) -> t1``."""
        return "; ".join(
            f"{s.op}{attr_text(s.attrs)}({', '.join(value_name(self, a) for a in s.args)}) -> t{i}"
            for i, s in enumerate(self.steps)
        )


def _number(value: object) -> object:
    """Ints and numpy scalars as Python floats, so ``exponent=2`` and ``2.0`` render the same."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value


def value_name(chain: Chain, index: int) -> str:
    """``x<i>`` for input i, ``t<j>`` for step j: the names the rendered source uses."""
    n = len(chain.inputs)
    return f"x{index}" if index < n else f"t{index - n}"


def attr_text(attrs: Iterable[tuple[str, object]]) -> str:
    items = [f"{k}={v}" for k, v in attrs]
    return f"[{', '.join(items)}]" if items else ""


def _check_attrs(where: str, step: Step) -> None:
    a = dict(step.attrs)
    if step.op == "Gelu" and a.get("approximate", "none") not in ("none", "tanh"):
        raise CodegenError(f"{where}: approximate must be 'none' or 'tanh'")
    if step.op == "Pow" and (len(step.args) == 1) != ("exponent" in a):
        raise CodegenError(f"{where}: give a constant exponent attr or an exponent arg, not both")
    if step.op == "Cast" and a.get("to") not in CAST_TARGETS:
        raise CodegenError(f"{where}: 'to' must be one of {', '.join(CAST_TARGETS)}")
    if step.op == "Constant" and not isinstance(a.get("value"), float):
        raise CodegenError(f"{where}: needs a float 'value' attr")
    for name in ("exponent", "min", "max"):
        if name in a and a[name] is not None and not isinstance(a[name], float):
            raise CodegenError(f"{where}: '{name}' must be a float")
        if name == "exponent" and name in a and not math.isfinite(a[name]):
            raise CodegenError(f"{where}: the exponent must be finite")
