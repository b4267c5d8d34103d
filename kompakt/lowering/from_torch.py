"""Capture an ``nn.Module`` into the IR: torch.export, then torch.onnx (dynamo) to onnx_ir.

Token inputs (integer tensors of rank >= 2) get dynamic batch and sequence dims by default,
named ``batch`` and ``sequence`` in the IR. Hugging Face models are captured with
``use_cache=False``; their outputs become graph outputs named after the ModelOutput fields
(``logits``, ``last_hidden_state``...), with caches dropped.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir
import torch

from kompakt.errors import CaptureError
from kompakt.ir.metadata import MODULE_KEY
from kompakt.lowering.normalize import normalize

DynamicSpec = Mapping[str, Mapping[int, str] | None] | bool | None
"""``None``: the default rule; ``False``: everything static; or per input name a mapping
``{dim index: label}`` (``{"input_ids": {0: "batch", 1: "sequence"}}``), ``None`` for static."""

_ROOT = "wrapped"
_AUTO_NAME = re.compile(r"^val_\d+$")


def capture_module(
    module: torch.nn.Module, example_inputs: Any, dynamic_shapes: DynamicSpec = None
) -> ir.Model:
    """Captures ``module`` called on ``example_inputs`` into an `ir.Model`.

    Args:
        module: The model. It is put in eval mode while captured (its mode is restored).
        example_inputs: A tensor, a tuple of positional inputs, or a dict of keyword inputs.
            Non-tensor values in a dict are passed to every call as fixed arguments.
        dynamic_shapes: Which dims stay symbolic; see `DynamicSpec`.

    Raises:
        CaptureError: no example inputs, or torch.export/ONNX conversion failed.
    """
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if example_inputs is None:
        raise CaptureError(
            f"capturing {type(module).__name__} needs example_inputs: the inputs its forward "
            "takes, e.g. compile(model, example_inputs=(input_ids,))"
        )
    tensors, fixed = _bind_inputs(module, example_inputs)
    labels = _dynamic_labels(tensors, dynamic_shapes)
    widened = _widen_size_one(tensors, labels)
    wrapper = _Wrapper(module, list(tensors), fixed)
    with _capture_mode(module), torch.no_grad():
        outputs = wrapper.flatten(wrapper.call(*widened.values()))
        output_names = wrapper.output_names
        if not outputs:
            raise CaptureError(f"{type(module).__name__} returned no tensors to capture")
        model = _export(wrapper, widened, labels, output_names).model
        if widened is not tensors and _specialized(model, labels):
            # Widening did not help (the model fixes the dim anyway): capture at the given size
            # so that at least the user's own example shape runs.
            model = _export(wrapper, tensors, labels, output_names).model
    model.graph.name = type(module).__name__
    normalize(model, source=type(module).__name__, strip_prefix=_ROOT)
    _name_dims(model, tensors, labels)
    _name_weights(model)
    _warn_specialized(model, tensors, labels)
    return model


def _bind_inputs(
    module: torch.nn.Module, example_inputs: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        signature = None
    if isinstance(example_inputs, Mapping):
        arguments = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        arguments = _bind_positional(signature, list(example_inputs))
    else:
        raise CaptureError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of named inputs; "
            f"got {type(example_inputs).__name__}"
        )
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    fixed = {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)}
    if not tensors:
        raise CaptureError("example_inputs contains no tensors")
    return tensors, fixed


def _bind_positional(signature: inspect.Signature | None, args: list) -> dict[str, Any]:
    if signature is not None:
        params = [
            p
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) >= len(args):
            return {p.name: a for p, a in zip(params, args, strict=False)}
    return {f"input_{i}": a for i, a in enumerate(args)}


def _dynamic_labels(
    tensors: dict[str, torch.Tensor], spec: DynamicSpec
) -> dict[str, dict[int, str]]:
    if spec is False:
        return {}
    if spec is None or spec is True:
        return {
            name: {0: "batch", 1: "sequence"}
            for name, t in tensors.items()
            if not t.is_floating_point()
            and not t.is_complex()
            and t.dtype != torch.bool
            and t.dim() >= 2
        }
    unknown = sorted(set(spec) - set(tensors))
    if unknown:
        raise CaptureError(
            f"dynamic_shapes names input(s) {unknown} that are not among the example inputs {list(tensors)}"
        )
    labels = {}
    for name, dims in spec.items():
        if not dims:
            continue
        for dim in dims:
            if not 0 <= dim < tensors[name].dim():
                raise CaptureError(
                    f"dynamic_shapes['{name}'] names dim {dim}, but the input has rank {tensors[name].dim()}"
                )
        labels[name] = {int(d): str(label) for d, label in dims.items()}
    return labels


def _widen_size_one(
    tensors: dict[str, torch.Tensor], labels: dict[str, dict[int, str]]
) -> dict[str, torch.Tensor]:
    """torch.export fixes dims of size 1 ("0/1 specialization"); capture them at size 2.

    Returns ``tensors`` itself when nothing needed widening.
    """
    if not any(tensors[n].shape[d] == 1 for n, dims in labels.items() for d in dims):
        return tensors
    widened = {}
    for name, tensor in tensors.items():
        for dim in labels.get(name, {}):
            if tensor.shape[dim] == 1:
                repeats = [1] * tensor.dim()
                repeats[dim] = 2
                tensor = tensor.repeat(*repeats)
        widened[name] = tensor
    return widened


class _Wrapper(torch.nn.Module):
    """Calls the user's module with named inputs and flattens what it returns to tensors."""

    def __init__(self, module: torch.nn.Module, names: list[str], fixed: dict[str, Any]) -> None:
        super().__init__()
        setattr(self, _ROOT, module)
        self.names = names
        self.fixed = fixed
        self.output_names: list[str] = []

    def call(self, *tensors: torch.Tensor) -> Any:
        return getattr(self, _ROOT)(**self.fixed, **dict(zip(self.names, tensors, strict=True)))

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.flatten(self.call(*tensors)))

    def flatten(self, result: Any) -> list[torch.Tensor]:
        pairs: list[tuple[str, torch.Tensor]] = []
        _flatten_into(result, "output", pairs, top=True)
        self.output_names = [name for name, _ in pairs]
        return [t for _, t in pairs]


def _flatten_into(obj: Any, name: str, out: list, top: bool = False) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((name, obj))
    elif isinstance(obj, Mapping) or hasattr(obj, "to_tuple"):  # dict or HF ModelOutput
        for key, value in obj.items():
            _flatten_into(value, str(key), out)
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            _flatten_into(value, f"{'output' if top else name}_{i}", out)
    # anything else (caches, None, python scalars) is not a graph output


@contextlib.contextmanager
def _capture_mode(module: torch.nn.Module):
    """eval mode and (for Hugging Face models) use_cache=False while capturing; afterwards every
    submodule is back in its own mode (a wrapper made for capture, like kv_cache's, is in
    training mode, and ``train(True)`` on it would switch on the wrapped model's dropout)."""
    modes = [(m, m.training) for m in module.modules()]
    config = getattr(module, "config", None)
    had_cache = getattr(config, "use_cache", None)
    module.eval()
    if had_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        if had_cache is not None:
            config.use_cache = had_cache


def _export(wrapper, tensors: dict[str, torch.Tensor], labels, output_names):
    auto = torch.export.Dim.AUTO
    specs = tuple(
        {dim: auto for dim in labels[name]} if name in labels else None for name in tensors
    )
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                wrapper,
                tuple(tensors.values()),
                dynamo=True,
                dynamic_shapes=(specs,),
                input_names=list(tensors),
                output_names=output_names,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as err:
        raise CaptureError(
            f"could not capture {type(getattr(wrapper, _ROOT)).__name__}: {_summary(err)}"
        ) from err
    finally:
        quiet.setLevel(level)


def _summary(err: Exception) -> str:
    """The useful line of torch.onnx's long error text."""
    text = str(err)
    cause = err.__cause__
    if "## Exception summary" in text:
        tail = text.split("## Exception summary", 1)[1].strip().split("\n\n")[0]
        return re.sub(r"\x1b\[[0-9;]*m", "", tail).strip()
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0] if text else type(err).__name__)


def _name_dims(model: ir.Model, tensors, labels) -> None:
    """Renames torch's symbols (s23, s27...) to the labels: batch, sequence."""
    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        dims = labels.get(value.name, {})
        if value.shape is None:
            continue
        for index, label in dims.items():
            dim = value.shape[index]
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                mapping.setdefault(dim.value, label)
    if not mapping:
        return
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in model.graph:
        values.extend(node.outputs)
    for value in values:
        if value.shape is None or not any(
            isinstance(d, ir.SymbolicDim) and d.value in mapping for d in value.shape
        ):
            continue
        value.shape = ir.Shape(
            [
                mapping.get(d.value, d.value) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape
            ]
        )


def _name_weights(model: ir.Model) -> None:
    """Names weights as the user's module does: drops the capture wrapper's prefix
    (``wrapped.model.embed_tokens.weight``) and gives torch's anonymous constants (``val_152``)
    their layer's name (``model.layers.0.q_proj.weight``)."""
    graph = model.graph
    taken = set(graph.initializers)
    prefix = _ROOT + "."
    for value in list(graph.initializers.values()):
        name = value.name or ""
        if name.startswith(prefix) and name[len(prefix) :] not in taken:
            _rename(value, name[len(prefix) :], taken)
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        module = node.metadata_props.get(MODULE_KEY, "")
        if (
            weight is None
            or not weight.is_initializer()
            or not module
            or not _AUTO_NAME.match(weight.name or "")
        ):
            continue
        new = f"{module}.weight"
        if new not in taken:
            _rename(weight, new, taken)


def _rename(value: ir.Value, new: str, taken: set[str]) -> None:
    taken.discard(value.name)
    value.name = new
    if value.const_value is not None:
        value.const_value.name = new
    taken.add(new)


def _specialized(model: ir.Model, labels) -> list[tuple[ir.Value, int, str]]:
    """(input, dim, label) for every dim asked to be dynamic that torch.export fixed."""
    return [
        (value, index, label)
        for value in model.graph.inputs
        for index, label in labels.get(value.name, {}).items()
        if value.shape is not None and not isinstance(value.shape[index], ir.SymbolicDim)
    ]


def _warn_specialized(model: ir.Model, tensors, labels) -> None:
    for value, index, label in _specialized(model, labels):
        warnings.warn(
            f"kompakt: torch.export fixed dim {index} ('{label}') of input '{value.name}' to "
            f"{value.shape[index]}; the compiled model only accepts that size",
            stacklevel=3,
        )
