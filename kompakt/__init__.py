"""kompakt: a compression compiler for neural networks, LLMs first.

import kompakt
cm = kompakt.compile(model, example_inputs=(ids,), target="cpu-w4")
logits = cm(ids)
cm.export_onnx("model.onnx")
print(cm.report())
"""

from kompakt import data
from kompakt.api import compile, load
from kompakt.errors import (
    CalibrationError,
    CaptureError,
    InputError,
    KompaktError,
    PassError,
    PipelineError,
    TargetError,
    UnsupportedOpError,
)
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.pipeline import Pipeline
from kompakt.passes.registry import register_pass
from kompakt.runtime.compiled_model import CompiledModel
from kompakt.targets.target import Target

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CaptureError",
    "CompileContext",
    "CompiledModel",
    "InputError",
    "KompaktError",
    "Pass",
    "PassError",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "Target",
    "TargetError",
    "UnsupportedOpError",
    "__version__",
    "compile",
    "data",
    "load",
    "register_pass",
]
