"""Which GPU a kernel launches on, as the launch heuristics need it.

On the CPU (Triton's interpreter) there is no GPU; the heuristics then take sm_90, the newest
tiling, since the interpreter only exercises the index math.
"""

from __future__ import annotations

import torch


def exact_arch(device: torch.device) -> str:
    """``sm_XY`` of the GPU ``device`` is (sm_89 and sm_90 differ for fp8); sm_90 off a GPU."""
    if device.type != "cuda":
        return "sm_90"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def tuning_arch(device: torch.device) -> str:
    """The tile tables' two buckets: sm_90 for Hopper and newer (and off a GPU), else sm_80."""
    if device.type != "cuda":
        return "sm_90"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def autotune_device(device: torch.device) -> str:
    """The autotune cache's device key: the GPU's name, or 'cpu-interpreter'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"
