"""The errors kompakt raises. Every user-facing failure is a `KompaktError`.

Each error names what is at fault (the op and node, the option, the file, the target token) so
a user can act on the message alone, without reading a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KompaktError(Exception):
    """Root of every error kompakt raises on purpose."""


class CaptureError(KompaktError):
    """A model could not be captured into the IR (torch.export or ONNX loading failed)."""


class UnsupportedOpError(KompaktError):
    """An op that a backend or pass cannot handle.

    Attributes:
        op: The op type, with its domain when it is not the default one (``com.microsoft::X``).
        node: The node's name in the graph.
        module: The source module path the node came from, when known.
    """

    def __init__(
        self,
        op: str,
        node: str,
        module: str | None = None,
        detail: str = "",
        message: str | None = None,
    ) -> None:
        self.op, self.node, self.module, self.detail = op, node, module, detail
        where = f" (from module '{module}')" if module else ""
        extra = f": {detail}" if detail else ""
        super().__init__(message or f"unsupported op '{op}' at node '{node}'{where}{extra}")


class PipelineError(KompaktError):
    """A pipeline string or pipeline structure is invalid (unknown pass, option, ordering)."""


class PassError(KompaktError):
    """A pass failed while running; the message names the pass and the passes before it."""


class TargetError(KompaktError):
    """A target string could not be parsed, or asks for something this build cannot do."""


class CodegenError(KompaktError):
    """Kernel generation failed."""


class CalibrationError(KompaktError):
    """Calibration data is missing, malformed, or contains NaN/Inf."""


class InputError(KompaktError):
    """Inputs given to a compiled model do not match its graph inputs."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Returns `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
