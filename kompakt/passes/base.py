"""What a pass is: a frozen dataclass whose fields are its options, and what it returns.

    @register_pass
    @dataclass(frozen=True)
    class QuantizeWeights(Pass):
        name: ClassVar[str] = "quantize-weights"
        requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
        bits: int = 4

        def run(self, model: ir.Model, ctx: CompileContext) -> PassResult: ...

A pass's option ``group_size`` is written ``group-size`` in pipeline strings. ``requires`` and
``provides`` are property names ("canonical", "shapes", ...) the PassManager checks before
anything runs, so a mis-ordered pipeline fails at once, naming the pass to add.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

if typing.TYPE_CHECKING:
    from kompakt.passes.instruments import Instrument
    from kompakt.targets.cost_model import CostModel
    from kompakt.targets.target import Target


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        changed: Whether the model was modified.
        stats: Counters for the report (``{"quantized": 12, "kept": 2}``).
        notes: Sentences a user should read (why a layer was skipped, a fallback taken).
        records: Per-item detail rows for the report (one dict per quantized weight, say).
    """

    changed: bool = False
    stats: dict[str, int | float | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CompileContext:
    """Everything a pass may use besides the model, passed explicitly (no globals).

    Attributes:
        target: The parsed target, when compiling for one.
        cost_model: Predicts time per node on the target; passes ask it before compressing.
        calibration: Calibration batches (an iterable of input tuples or dicts), if given.
        seed: Seed for anything random a pass does.
        instruments: Hooks called around each pass (timing, stats, IR dumps, verification).
        progress: Whether long passes show a progress bar.
    """

    target: Target | None = None
    cost_model: CostModel | None = None
    calibration: Iterable[Any] | None = None
    seed: int = 0
    instruments: list[Instrument] = field(default_factory=list)
    progress: bool = True


@dataclass(frozen=True)
class Option:
    """One option of a pass, as pipeline strings and `kompakt passes` show it."""

    name: str  # kebab-case, as written in pipeline strings
    field: str  # the dataclass field
    type: Any  # the resolved annotation
    default: Any
    doc: str


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    uses_calibration: ClassVar[bool] = False  # reads ctx.calibration (GPTQ, AWQ, SmoothQuant...)

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    @classmethod
    def options(cls) -> list[Option]:
        """The pass's options in declaration order, with their types and defaults."""
        hints = _type_hints(cls)
        docs = _option_docs(cls)
        result = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            result.append(
                Option(
                    f.name.replace("_", "-"), f.name, hints[f.name], default, docs.get(f.name, "")
                )
            )
        return result

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def non_default_options(self) -> dict[str, Any]:
        """Options whose value differs from the default, by kebab-case name, in field order."""
        return {
            o.name: getattr(self, o.field)
            for o in self.options()
            if getattr(self, o.field) != o.default
        }


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations, also for passes defined in a script run with runpy (whose
    module is not in sys.modules, where typing looks for the names)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        namespace = dict(globals())
        for klass in reversed(cls.__mro__):
            run = klass.__dict__.get("run")
            if run is not None:
                namespace.update(run.__globals__)
        return typing.get_type_hints(cls, globalns=namespace)


def _option_docs(cls: type) -> dict[str, str]:
    """Option docs from the ``Args:`` section of the class docstring (Google style)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    in_args = False
    current = None
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Options:"):
            in_args = True
            continue
        if in_args:
            if not stripped:
                current = None
                continue
            if stripped.endswith(":") and " " not in stripped:
                in_args = False  # next section
                continue
            head, sep, rest = stripped.partition(":")
            if sep and head.replace("_", "").isidentifier() and " " not in head:
                current = head
                docs[current] = rest.strip()
            elif current:
                docs[current] += " " + stripped
    return docs


def is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


def strip_optional(annotation: Any) -> Any:
    if is_optional(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return annotation
