"""Hooks the PassManager calls around each pass: timing, stats, IR dumps, verification."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.printer import format_graph
from kompakt.ir.verify import verify
from kompakt.passes.base import Pass, PassResult


class Instrument:
    """Base hook; override what you need. ``index`` is the pass's position in the pipeline."""

    def before_pass(self, index: int, p: Pass, model: ir.Model) -> None:
        pass

    def after_pass(self, index: int, p: Pass, model: ir.Model, result: PassResult) -> None:
        pass


@dataclass
class PassRecord:
    """What one pass did, as the report shows it."""

    name: str
    text: str
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    ops_added: dict[str, int] = field(default_factory=dict)
    ops_removed: dict[str, int] = field(default_factory=dict)
    result: PassResult = field(default_factory=PassResult)


class StatsInstrument(Instrument):
    """Records time, node counts and the op histogram change of every pass."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self._start = 0.0
        self._ops: collections.Counter[str] = collections.Counter()

    def before_pass(self, index: int, p: Pass, model: ir.Model) -> None:
        self._ops = _op_histogram(model)
        self._start = time.perf_counter()

    def after_pass(self, index: int, p: Pass, model: ir.Model, result: PassResult) -> None:
        seconds = time.perf_counter() - self._start
        after = _op_histogram(model)
        added = dict(sorted((after - self._ops).items()))
        removed = dict(sorted((self._ops - after).items()))
        self.records.append(
            PassRecord(
                name=p.name,
                text="",
                seconds=seconds,
                nodes_before=sum(self._ops.values()),
                nodes_after=sum(after.values()),
                ops_added=added,
                ops_removed=removed,
                result=result,
            )
        )


def _op_histogram(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain else n.op_type) for n in model.graph
    )


class DumpIRInstrument(Instrument):
    """Writes the IR as text after every pass: ``<dir>/00-input.txt``, ``01-<pass>.txt``, ..."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KompaktError(f"cannot create IR dump folder '{self.directory}': {err}") from err

    def before_pass(self, index: int, p: Pass, model: ir.Model) -> None:
        if index == 0:
            self._write("00-input", model)

    def after_pass(self, index: int, p: Pass, model: ir.Model, result: PassResult) -> None:
        self._write(f"{index + 1:02d}-{p.name}", model)

    def _write(self, stem: str, model: ir.Model) -> None:
        (self.directory / f"{stem}.txt").write_text(format_graph(model.graph) + "\n")


class VerifyInstrument(Instrument):
    """Verifies the IR after every pass, so a broken pass is caught where it breaks things."""

    def after_pass(self, index: int, p: Pass, model: ir.Model, result: PassResult) -> None:
        verify(model)
