"""Shapes of every value on a real run, for the cost model and the report."""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir
import torch

from kompakt.ir.tensors import torch_dtype
from kompakt.runtime.plan import ExecutionPlan, Observer


def observed_shapes(
    model: ir.Model, feeds: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, ...]]:
    """Runs the reference runtime once and records each named value's shape."""
    shapes: dict[str, tuple[int, ...]] = {name: tuple(t.shape) for name, t in feeds.items()}
    ExecutionPlan(model).run(feeds, observer=shape_recorder(shapes))
    return shapes


def shape_recorder(shapes: dict[str, tuple[int, ...]]) -> Observer:
    """An observer for `ExecutionPlan.run` that writes each named output's shape into ``shapes``."""

    def record(node: ir.Node, inputs, outputs) -> None:
        for value, tensor in zip(node.outputs, outputs, strict=False):
            if value.name and isinstance(tensor, torch.Tensor):
                shapes[value.name] = tuple(tensor.shape)

    return record


def synthetic_feeds(model: ir.Model, dim_value: int = 1) -> tuple[dict[str, torch.Tensor], str]:
    """Inputs for a model nobody gave examples for: symbolic dims set to ``dim_value``,
    integer inputs zero (a valid token id), floats ones. Returns the feeds and a description."""
    feeds = {}
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else dim_value for d in (value.shape or [])]
        dtype = torch_dtype(value.dtype) if value.dtype is not None else torch.float32
        maker = torch.ones if dtype.is_floating_point else torch.zeros
        feeds[value.name] = maker(dims, dtype=dtype)
    return feeds, f"no example inputs given: symbolic dims assumed {dim_value}"
