"""The compile report: what each pass did, size before and after, predicted time on the target.

`Report` is plain data (JSON-serializable via `to_dict`, saved with the model); `str(report)`
renders it as text for a terminal.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from kompakt.ir.tensors import storage_bytes
from kompakt.passes.instruments import PassRecord
from kompakt.targets.cost_model import NodeCost

_QUANT_PARAMS = {"DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2)}
MAX_ROWS = 12


@dataclass
class SizeStats:
    """Weights of a model: parameter count and bytes, total and per dtype."""

    parameters: int = 0
    bytes: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ir.Model) -> SizeStats:
        """Parameters exclude quantization scales and zero points; bytes include them."""
        overhead = set()
        for node in model.graph:
            for index in _QUANT_PARAMS.get(node.op_type, ()):
                if index < len(node.inputs) and node.inputs[index] is not None:
                    overhead.add(id(node.inputs[index]))
        stats = cls()
        by_dtype: collections.Counter[str] = collections.Counter()
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            elements = tensor.size
            size = int(storage_bytes(tensor.dtype, elements))
            by_dtype[tensor.dtype.name.lower()] += size
            stats.bytes += size
            if id(value) not in overhead:
                stats.parameters += elements
        stats.bytes_by_dtype = dict(by_dtype.most_common())
        return stats


@dataclass
class LatencyEstimate:
    """Predicted time on the target at one set of input shapes."""

    shapes: str
    seconds: float
    nodes: list[NodeCost] = field(default_factory=list)


@dataclass
class KernelTime:
    """One step of a run (a fused kernel or an op run through torch): predicted vs measured."""

    node: str
    op: str
    module: str
    predicted: float
    measured: float


@dataclass
class Report:
    target: str
    device: str
    backend: str
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    size_before: SizeStats = field(default_factory=SizeStats)
    size_after: SizeStats = field(default_factory=SizeStats)
    latency_before: LatencyEstimate | None = None
    latency_after: LatencyEstimate | None = None
    latency_note: str = ""
    backend_notes: str = ""  # what the backend runs how (the triton backend's kernel summary)
    kernel_times: list[KernelTime] = field(default_factory=list)
    kernel_times_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        data["passes"] = [_record_from_dict(p) for p in data.get("passes", [])]
        data["size_before"] = SizeStats(**data.get("size_before", {}))
        data["size_after"] = SizeStats(**data.get("size_after", {}))
        for key in ("latency_before", "latency_after"):
            if data.get(key):
                est = dict(data[key])
                est["nodes"] = [NodeCost(**n) for n in est.get("nodes", [])]
                data[key] = LatencyEstimate(**est)
        data["kernel_times"] = [KernelTime(**k) for k in data.get("kernel_times", [])]
        return cls(**data)

    def __str__(self) -> str:
        return render(self)


def _record_from_dict(data: dict[str, Any]) -> PassRecord:
    from kompakt.passes.base import PassResult

    data = dict(data)
    data["result"] = PassResult(**data.get("result", {}))
    return PassRecord(**data)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:,.3f} ms"
    return f"{seconds * 1e6:,.1f} µs"


def render(report: Report, verbose: bool = False) -> str:
    """The report as text; ``verbose`` lists every node and every note."""
    limit = None if verbose else MAX_ROWS
    out = [
        f"kompakt report — target '{report.target}' ({report.device}), backend {report.backend}",
        f"pipeline: {report.pipeline}",
        "",
        "passes:",
    ]
    for p in report.passes:
        change = f"{p.nodes_before} -> {p.nodes_after} nodes"
        stats = ", ".join(f"{k}={v}" for k, v in p.result.stats.items())
        out.append(
            f"  {p.name:<34} {p.seconds * 1e3:9.1f} ms  {change}"
            + (f"  [{stats}]" if stats else "")
        )
        if p.ops_added or p.ops_removed:
            delta = [f"+{n} {op}" for op, n in p.ops_added.items()] + [
                f"-{n} {op}" for op, n in p.ops_removed.items()
            ]
            out.append(f"  {'':<34} ops: {', '.join(delta)}")
        notes = p.result.notes if limit is None else p.result.notes[:limit]
        out += [f"  {'':<34} note: {n}" for n in notes]
        if len(notes) < len(p.result.notes):
            out.append(
                f"  {'':<34} ... {len(p.result.notes) - len(notes)} more notes (render_report(verbose=True))"
            )
    layer_rows = [(p.name, r) for p in report.passes for r in p.result.records]
    if layer_rows:
        out += ["", "layers:"]
        out.append(f"  {'module':<44} {'shape':<14} {'scheme':<22} {'bytes':>18}  {'SQNR':>8}")
        shown = layer_rows if limit is None else layer_rows[:limit]
        for _, r in shown:
            shape = "x".join(map(str, r.get("shape", [])))
            size = f"{r.get('bytes_before', 0):,} -> {r.get('bytes_after', 0):,}"
            sqnr = r.get("sqnr_db")
            out.append(
                f"  {r.get('module', '?')[:44]:<44} {shape:<14} {r.get('scheme', ''):<22} {size:>18}  "
                + (f"{sqnr:6.1f} dB" if sqnr is not None else "")
            )
        if len(shown) < len(layer_rows):
            out.append(
                f"  ... {len(layer_rows) - len(shown)} more layers (render_report(verbose=True))"
            )
    b, a = report.size_before, report.size_after
    ratio = b.bytes / a.bytes if a.bytes else float("nan")
    out += [
        "",
        "size:",
        f"  before: {b.parameters:,} parameters, {_mb(b.bytes)}  ({_dtypes(b)})",
        f"  after:  {a.parameters:,} parameters, {_mb(a.bytes)}  ({_dtypes(a)})",
        f"  {ratio:.2f}x smaller",
    ]
    out += ["", f"predicted time on {report.device} (roofline):"]
    if report.latency_after is None:
        out.append(f"  unavailable: {report.latency_note or 'no shapes'}")
    else:
        before, after = report.latency_before, report.latency_after
        out.append(f"  shapes: {after.shapes}")
        if before is not None:
            speed = before.seconds / after.seconds if after.seconds else float("nan")
            out.append(
                f"  before: {_time(before.seconds)}   after: {_time(after.seconds)}   ({speed:.2f}x)"
            )
        else:
            out.append(f"  after: {_time(after.seconds)}")
        costly = sorted(after.nodes, key=lambda c: -c.seconds)
        costly = costly if limit is None else costly[:limit]
        out.append(f"  {'node':<40} {'op':<18} {'time':>12} {'bound':>9}  module")
        for c in costly:
            out.append(
                f"  {c.node[:40]:<40} {c.op[:18]:<18} {_time(c.seconds):>12} {c.bound:>9}  {c.module}"
            )
    if report.backend_notes:
        out += ["", f"{report.backend} backend:"]
        out += [f"  {line}" for line in report.backend_notes.splitlines()]
    out += render_kernel_times(report, limit)
    return "\n".join(out)


def render_kernel_times(report: Report, limit: int | None = MAX_ROWS) -> list[str]:
    """The predicted-vs-measured section (empty before `CompiledModel.profile` ran)."""
    if not report.kernel_times:
        return []
    rows = sorted(report.kernel_times, key=lambda k: -k.measured)
    shown = rows if limit is None else rows[:limit]
    predicted = sum(k.predicted for k in rows)
    measured = sum(k.measured for k in rows)
    out = [
        "",
        f"predicted vs measured per kernel ({report.kernel_times_note}):",
        f"  total: predicted {_time(predicted)}, measured {_time(measured)}",
        f"  {'node':<40} {'op':<28} {'predicted':>12} {'measured':>12}  module",
    ]
    for k in shown:
        out.append(
            f"  {k.node[:40]:<40} {k.op[:28]:<28} {_time(k.predicted):>12} "
            f"{_time(k.measured):>12}  {k.module}"
        )
    if len(shown) < len(rows):
        out.append(f"  ... {len(rows) - len(shown)} more (render_report(verbose=True))")
    return out


def _dtypes(size: SizeStats) -> str:
    return ", ".join(f"{k} {_mb(v)}" for k, v in size.bytes_by_dtype.items()) or "no weights"
