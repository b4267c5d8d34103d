"""Hardware presets: the numbers the cost model reasons with, each with its source.

Peak rates are dense (no 2:4 sparsity bonus). ``peak_flops`` is keyed by compute type:
"fp32" (no tensor cores), "tf32", "fp16", "bf16", "fp8", "int8".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kompakt.errors import TargetError, did_you_mean

T = 1e12
G = 1e9


@dataclass(frozen=True)
class HardwareSpec:
    """What a device can do, for the roofline.

    Attributes:
        name: Short name used in target strings ("a100").
        description: Full product name.
        kind: "gpu" or "cpu".
        memory_bandwidth: Bytes per second from device memory.
        peak_flops: Dense peak operations per second by compute type.
        memory_bytes: Device memory size.
        launch_overhead: Seconds added per kernel/op launch.
        compute_capability: (major, minor) for NVIDIA GPUs.
        source: Where the numbers come from.
    """

    name: str
    description: str
    kind: str
    memory_bandwidth: float
    peak_flops: dict[str, float] = field(default_factory=dict)
    memory_bytes: float = 0.0
    launch_overhead: float = 0.0
    compute_capability: tuple[int, int] | None = None
    source: str = ""

    def supports(self, compute: str) -> bool:
        return compute in self.peak_flops

    def peak(self, compute: str) -> float:
        """Peak rate for ``compute``, falling back to fp32 when the device lacks that unit."""
        return self.peak_flops.get(compute, self.peak_flops["fp32"])


# GPU kernel launch: ~4 µs per launch without CUDA graphs is the usual figure for PyTorch eager
# on A100/H100 (launch latency plus framework dispatch); refined by `kompakt bench` tables.
_GPU_LAUNCH = 4e-6

# H100 SXM5 and H200 SXM have the same SMs and clocks; only memory differs (dense rates).
_HOPPER_SXM = {
    "fp32": 67 * T,
    "tf32": 494.7 * T,
    "fp16": 989.4 * T,
    "bf16": 989.4 * T,
    "fp8": 1978.9 * T,
    "int8": 1978.9 * T,
}

PRESETS: dict[str, HardwareSpec] = {
    "a100": HardwareSpec(
        name="a100",
        description="NVIDIA A100 SXM4 80GB",
        kind="gpu",
        memory_bandwidth=2039 * G,  # HBM2e, A100 datasheet
        peak_flops={
            "fp32": 19.5 * T,
            "tf32": 156 * T,
            "fp16": 312 * T,
            "bf16": 312 * T,
            "int8": 624 * T,
        },
        memory_bytes=80e9,
        launch_overhead=_GPU_LAUNCH,
        compute_capability=(8, 0),
        source="NVIDIA A100 Tensor Core GPU datasheet (dense rates)",
    ),
    "h100": HardwareSpec(
        name="h100",
        description="NVIDIA H100 SXM5 80GB",
        kind="gpu",
        memory_bandwidth=3350 * G,  # HBM3, H100 datasheet
        peak_flops=_HOPPER_SXM,
        memory_bytes=80e9,
        launch_overhead=_GPU_LAUNCH,
        compute_capability=(9, 0),
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM5 (dense rates = half the sparse ones)",
    ),
    "h200": HardwareSpec(
        name="h200",
        description="NVIDIA H200 SXM 141GB",
        kind="gpu",
        memory_bandwidth=4800 * G,  # HBM3e, H200 datasheet
        peak_flops=_HOPPER_SXM,
        memory_bytes=141e9,
        launch_overhead=_GPU_LAUNCH,
        compute_capability=(9, 0),
        source="NVIDIA H200 Tensor Core GPU datasheet, SXM (same SMs as H100 SXM)",
    ),
    "l4": HardwareSpec(
        name="l4",
        description="NVIDIA L4 24GB",
        kind="gpu",
        memory_bandwidth=300 * G,  # GDDR6, L4 datasheet
        peak_flops={
            "fp32": 30.3 * T,
            "tf32": 60 * T,
            "fp16": 121 * T,
            "bf16": 121 * T,
            "fp8": 242.5 * T,
            "int8": 242.5 * T,
        },
        memory_bytes=24e9,
        launch_overhead=_GPU_LAUNCH,
        compute_capability=(8, 9),
        source="NVIDIA L4 Tensor Core GPU datasheet (dense rates = half the sparse ones)",
    ),
    "rtx4090": HardwareSpec(
        name="rtx4090",
        description="NVIDIA GeForce RTX 4090 24GB",
        kind="gpu",
        memory_bandwidth=1008 * G,  # GDDR6X, Ada whitepaper
        # GeForce tensor cores run fp16/bf16/fp8 with fp32 accumulation at half rate.
        peak_flops={
            "fp32": 82.6 * T,
            "tf32": 82.6 * T,
            "fp16": 165.2 * T,
            "bf16": 165.2 * T,
            "fp8": 330.3 * T,
            "int8": 660.6 * T,
        },
        memory_bytes=24e9,
        launch_overhead=_GPU_LAUNCH,
        compute_capability=(8, 9),
        source="NVIDIA Ada Lovelace GPU architecture whitepaper, appendix (RTX 4090, dense)",
    ),
    "cpu": HardwareSpec(
        name="cpu",
        description="x86-64 CPU, 2 cores, AVX-512 + AMX (the project's reference machine)",
        kind="cpu",
        # benchmarks/cpu_roofline.py on 2026-11-22: 25.3-25.8 GB/s copy, 312 GFLOP/s fp32 and
        # 1969-2085 GFLOP/s bf16 torch.matmul at 2048^3, ORT 0.3 µs per extra op.
        memory_bandwidth=25.5 * G,
        # int8: AMX runs int8 at twice its bf16 rate (Intel AMX: 1024 vs 512 ops/cycle/core).
        peak_flops={"fp32": 312 * G, "bf16": 2000 * G, "int8": 4000 * G},
        memory_bytes=24 * 2**30,
        launch_overhead=0.3e-6,
        source="measured by benchmarks/cpu_roofline.py (see benchmarks/RESULTS.md)",
    ),
}


def get_device(name: str) -> HardwareSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise TargetError(
            f"unknown device '{name}'{did_you_mean(name, PRESETS)}; devices: {', '.join(PRESETS)}"
        ) from None
