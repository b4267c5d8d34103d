"""Measures the numbers the `cpu` hardware preset cites: memory bandwidth, matmul peak, and
ONNX Runtime's per-op overhead, on the machine it runs on.

    python benchmarks/cpu_roofline.py

Bandwidth: a 256 MiB tensor copy (read + write) with torch; peak: a 2048^3 fp32 torch.matmul;
overhead: ONNX Runtime running 1 vs 101 chained Adds of 16 floats. Medians of repeated runs.
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from kompakt.timing import median_seconds


def copy_bandwidth() -> float:
    src = torch.ones(64 * 1024 * 1024)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() * 4 / seconds  # bytes read + written


def matmul_peak(dtype: torch.dtype) -> float:
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats=10)
    return 2 * n**3 / seconds


def _ort_chain(length: int) -> ort.InferenceSession:
    names = ["x"] + [f"t{i}" for i in range(length)]
    nodes = [helper.make_node("Add", [names[i], "x"], [names[i + 1]]) for i in range(length)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Add
    return ort.InferenceSession(model.SerializeToString(), options)


def ort_op_overhead() -> tuple[float, float]:
    """(seconds per session.run of one op, extra seconds per additional op in a graph)."""
    feed = {"x": np.ones(16, np.float32)}
    one, chain = _ort_chain(1), _ort_chain(101)
    t1 = median_seconds(lambda: one.run(None, feed), repeats=2000, warmup=100)
    t101 = median_seconds(lambda: chain.run(None, feed), repeats=500, warmup=50)
    return t1, (t101 - t1) / 100


def main() -> None:
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": round(copy_bandwidth() / 1e9, 1),
        "fp32_matmul_GFLOPs": round(matmul_peak(torch.float32) / 1e9, 1),
        "bf16_matmul_GFLOPs": round(matmul_peak(torch.bfloat16) / 1e9, 1),
    }
    run_once, per_op = ort_op_overhead()
    result["ort_session_run_us"] = round(run_once * 1e6, 2)
    result["ort_per_op_us"] = round(per_op * 1e6, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
