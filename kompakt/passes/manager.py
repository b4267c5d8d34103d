"""PassManager: checks a pipeline as a whole, then runs it pass by pass with instruments."""

from __future__ import annotations

import os

import onnx_ir as ir

from kompakt.errors import KompaktError, PassError, PipelineError
from kompakt.passes.base import CompileContext
from kompakt.passes.instruments import (
    Instrument,
    PassRecord,
    StatsInstrument,
    VerifyInstrument,
)
from kompakt.passes.pipeline import Pipeline
from kompakt.passes.registry import providers_of

CAPTURED = frozenset({"captured"})
"""Properties every model has once a front end has produced it."""


def verify_between_passes_default() -> bool:
    """Verification between passes is on in debug/test runs (``KOMPAKT_VERIFY=1``)."""
    return os.environ.get("KOMPAKT_VERIFY", "") not in ("", "0", "false")


class PassManager:
    """Runs a `Pipeline` over a model.

    Args:
        pipeline: The passes, as a `Pipeline` or a pipeline string.
        verify: Verify the IR after every pass (defaults to ``KOMPAKT_VERIFY``).
        initial: Properties the input model already has.
    """

    def __init__(
        self,
        pipeline: Pipeline | str,
        verify: bool | None = None,
        initial: frozenset[str] = CAPTURED,
    ) -> None:
        self.pipeline = Pipeline.parse(pipeline) if isinstance(pipeline, str) else pipeline
        self.verify = verify_between_passes_default() if verify is None else verify
        self.initial = initial
        self.check()

    def check(self) -> None:
        """Raises `PipelineError` if a pass requires a property no earlier pass provides."""
        have = set(self.initial)
        for index, p in enumerate(self.pipeline.passes):
            missing = sorted(p.requires - have)
            if missing:
                prop = missing[0]
                providers = providers_of(prop)
                hint = (
                    f"add {' or '.join(repr(n) for n in providers)} before it"
                    if providers
                    else "no registered pass provides it"
                )
                raise PipelineError(
                    f"pass '{p.name}' (position {index + 1} in '{self.pipeline}') requires "
                    f"'{prop}', which no earlier pass provides; {hint}"
                )
            have -= p.invalidates
            have |= p.provides

    def run(self, model: ir.Model, ctx: CompileContext | None = None) -> list[PassRecord]:
        """Runs every pass in order on ``model`` (in place); returns what each did."""
        ctx = ctx or CompileContext()
        stats = StatsInstrument()
        instruments: list[Instrument] = [stats, *ctx.instruments]
        if self.verify:
            instruments.append(VerifyInstrument())
        entries = self.pipeline.entries
        for index, entry in enumerate(entries):
            p = entry.pass_
            for inst in instruments:
                inst.before_pass(index, p, model)
            try:
                result = p.run(model, ctx)
            except Exception as err:
                raise _failure(entries, index, err) from err
            for inst in instruments:
                try:
                    inst.after_pass(index, p, model, result)
                except KompaktError as err:
                    raise _failure(entries, index, err) from err
        for record, entry in zip(stats.records, entries, strict=True):
            record.text = entry.text
        return stats.records


def _failure(entries, index: int, err: Exception) -> PassError:
    name = entries[index].pass_.name
    before = ",".join(e.text for e in entries[:index]) or "nothing"
    kind = "" if isinstance(err, KompaktError) else f"{type(err).__name__}: "
    return PassError(f"pass '{name}' failed (after: {before}): {kind}{err}")
