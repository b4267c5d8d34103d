"""Turning what a user passes as ``calibration=`` into checked feeds for the graph's inputs.

Accepted: an iterable of batches, each a dict ``{input name: tensor}``, a tuple of tensors in
graph-input order, or a single tensor (for one-input graphs). Tensors may be torch or numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kompakt.errors import CalibrationError
from kompakt.ir.tensors import torch_dtype


def missing_calibration(pass_name: str) -> CalibrationError:
    return CalibrationError(
        f"pass '{pass_name}' needs calibration data: compile(..., calibration=batches), where "
        "batches is a list of input tuples or dicts (kompakt.data.text_batches makes them from text)"
    )


def calibration_feeds(
    model: ir.Model, calibration: Iterable[Any] | None, needed_by: str
) -> list[dict[str, torch.Tensor]]:
    """The calibration batches as feed dicts, validated against the graph inputs.

    Raises:
        CalibrationError: naming the batch and input at fault.
    """
    if calibration is None:
        raise missing_calibration(needed_by)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    names = [v.name for v in inputs]
    feeds = []
    for index, batch in enumerate(calibration):
        feeds.append(_one_batch(batch, inputs, names, index))
    if not feeds:
        raise CalibrationError(f"pass '{needed_by}' got an empty calibration set")
    return feeds


def _one_batch(
    batch: Any, inputs: list[ir.Value], names: list[str], index: int
) -> dict[str, torch.Tensor]:
    where = f"calibration batch {index}"
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        batch = (batch,)
    if isinstance(batch, Mapping):
        unknown = sorted(set(batch) - set(names))
        if unknown:
            raise CalibrationError(
                f"{where} has input(s) {unknown} the model does not take; inputs: {names}"
            )
        given = dict(batch)
    elif isinstance(batch, (tuple, list)):
        if len(batch) > len(names):
            raise CalibrationError(
                f"{where} has {len(batch)} tensors; the model takes {len(names)}: {names}"
            )
        given = dict(zip(names, batch, strict=False))
    else:
        raise CalibrationError(
            f"{where} must be a dict, a tuple of tensors or a tensor; got {type(batch).__name__}"
        )
    missing = [n for n in names if n not in given]
    if missing:
        raise CalibrationError(f"{where} lacks input(s) {missing}")
    feeds = {}
    for value in inputs:
        tensor = given[value.name]
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(tensor)
        if not isinstance(tensor, torch.Tensor):
            raise CalibrationError(
                f"{where}, input '{value.name}': expected a tensor, got {type(tensor).__name__}"
            )
        if value.dtype is not None:
            tensor = tensor.to(torch_dtype(value.dtype))
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CalibrationError(f"{where}, input '{value.name}' contains NaN or Inf")
        feeds[value.name] = tensor
    return feeds
