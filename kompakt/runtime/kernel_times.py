"""Per-kernel time: each step of a run timed on the device, next to the cost model's prediction.

A step is one kernel launch of the plan: a fused group's kernel, or an op run through torch.
On a GPU the clock synchronizes before reading the time, so each step is timed alone (the sum is
a little above a graph replay's time). On the CPU, under Triton's interpreter, the numbers only
show where the interpreter spends its time; the report says which it was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

from kompakt.errors import KompaktError
from kompakt.ir.metadata import module_of
from kompakt.report import KernelTime
from kompakt.runtime.plan import ExecutionPlan
from kompakt.runtime.profile import shape_recorder
from kompakt.targets.cost_model import CostModel
from kompakt.targets.hardware import HardwareSpec


def measure(
    plan: ExecutionPlan,
    feeds: Mapping[str, torch.Tensor],
    device: HardwareSpec,
    model,
    repeats: int = 3,
) -> list[KernelTime]:
    """Runs ``plan`` once to warm up, then ``repeats`` times with every step timed (median)."""
    if repeats < 1:
        raise KompaktError(f"repeats must be >= 1, got {repeats}")
    on_gpu = plan.device.type == "cuda"

    def clock() -> float:
        if on_gpu:
            torch.cuda.synchronize(plan.device)
        return time.perf_counter()

    shapes: dict[str, tuple[int, ...]] = {name: tuple(t.shape) for name, t in feeds.items()}
    plan.run(feeds, observer=shape_recorder(shapes))  # the warm-up gives the cost model shapes
    runs = []
    for _ in range(repeats):
        plan.run(feeds, clock=clock)
        runs.append(list(plan.step_seconds))
    measured = [statistics.median(times) for times in zip(*runs, strict=True)]
    predicted = {c.node: c for c in CostModel(device).estimate(model, shapes)}
    rows = []
    for step, seconds in zip(plan.steps, measured, strict=True):
        cost = predicted.get(step.node.name)
        rows.append(
            KernelTime(
                node=step.node.name or "?",
                op=cost.op if cost is not None else step.node.op_type,
                module=module_of(step.node),
                predicted=cost.seconds if cost is not None else 0.0,
                measured=seconds,
            )
        )
    return rows
