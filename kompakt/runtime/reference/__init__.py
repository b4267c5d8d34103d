"""The reference runtime: every ONNX op kompakt runs, implemented with torch ops.

It is the semantic definition the passes, fusions and generated kernels are checked against.
`supported_ops` lists the (domain, op_type) pairs it can execute; `kompakt.runtime.plan`
executes a model with it.
"""

from kompakt.runtime.reference.registry import supported_ops

__all__ = ["supported_ops"]
