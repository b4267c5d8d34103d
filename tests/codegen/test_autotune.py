"""The autotune cache and its use: measured choices are stored per device and followed offline."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import EXAMPLE_SHAPE, tokens

import kompakt
from kompakt.codegen.autotune import AutotuneCache, bucket, tune
from kompakt.codegen.dequant_matmul import pack
from kompakt.codegen.dequant_matmul.reference import dequant_matmul_reference
from kompakt.codegen.dequant_matmul.spec import Config
from kompakt.codegen.dequant_matmul.tuning import (
    cache_key,
    candidates,
    heuristic,
    launch_choice,
    tune_shape,
)
from kompakt.errors import CodegenError

pytest.importorskip("triton")


def _weight(k=64, n=40, group=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (k, n), generator=g).to(torch.int8)
    scale = torch.rand(k // group, n, generator=g) * 0.1
    return pack(q, scale, None, 4, group, dtype)


def test_bucket_rounds_rows_to_a_power_of_two():
    assert bucket("k", m=5, n=7, k=9) == "k|k=9|m=8|n=7"
    assert bucket("k", m=1, n=7, k=9) == bucket("k", m=1, k=9, n=7)


def test_cache_round_trips_and_rejects_corrupt_files(tmp_path):
    cache = AutotuneCache.for_device("NVIDIA H100 80GB HBM3", tmp_path)
    cache.put("a|m=1", {"family": "triton", "block_n": 64}, 1e-5, 3)
    path = cache.save()
    assert path.name == "NVIDIA_H100_80GB_HBM3.json"
    again = AutotuneCache.for_device("NVIDIA H100 80GB HBM3", tmp_path)
    assert again.get("a|m=1") == {"family": "triton", "block_n": 64}
    assert again.get("a|m=2") is None
    path.write_text("{not json")
    with pytest.raises(CodegenError, match="unreadable"):
        AutotuneCache.for_device("NVIDIA H100 80GB HBM3", tmp_path)
    path.write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(CodegenError, match="unknown format"):
        AutotuneCache.for_device("NVIDIA H100 80GB HBM3", tmp_path)


def test_tune_keeps_the_fastest_and_skips_failures(tmp_path):
    cache = AutotuneCache.for_device("gpu", tmp_path)
    seconds = {1: 3.0, 2: 1.0, 3: 2.0}
    ran = []

    def run(choice):
        ran.append(choice["id"])
        if choice["id"] == 4:
            raise CodegenError("does not fit")

    def timer(fn):
        fn()
        return seconds[ran[-1]]

    best = tune(cache, "key", [{"id": i} for i in (1, 2, 3, 4)], run, timer)
    assert best == {"id": 2}
    assert cache.entries["key"] == {"config": {"id": 2}, "seconds": 1.0, "candidates": 4}
    with pytest.raises(CodegenError, match="no candidate"):
        tune(cache, "key2", [{"id": 4}], run, timer)

    def out_of_resources(choice):
        raise RuntimeError("out of resource: shared memory")  # as Triton's errors are

    assert tune(cache, "key3", [{"id": 2}, {"id": 4}], run, timer) == {"id": 2}
    with pytest.raises(CodegenError, match="shared memory"):
        tune(cache, "key4", [{"id": 5}], out_of_resources, lambda fn: fn() or 1.0)


def test_the_key_tells_dtypes_apart():
    fp32, fp16 = _weight(), _weight(dtype=torch.float16)
    assert cache_key(1, fp32) != cache_key(1, fp16)
    assert cache_key(1, fp32).endswith("|float32") and cache_key(3, fp32) == cache_key(4, fp32)


def test_candidates_include_the_heuristic_and_are_all_valid():
    weight = _weight()
    options = candidates(3, weight)
    assert heuristic(3, weight) in options
    assert all(o["family"] == "triton" for o in options)  # CUDA C only with a GPU
    x = torch.randn(3, 64)
    want = dequant_matmul_reference(x, weight)
    for option in options[:3]:
        torch.testing.assert_close(launch_choice(option, x, weight), want)
    # the alternatives a GPU decides between: the split-K sum in a second kernel, and the
    # register GEMV tile beside the heuristic's 16-row tensor-core one (M = 3)
    base = heuristic(3, weight)
    assert base["split_k"] > 1 and base["serial_reduce"] and base["block_m"] == 16
    alternatives = [o for o in options if not o["serial_reduce"] or o["block_m"] != 16]
    assert {(o["serial_reduce"], o["block_m"]) for o in alternatives} == {(False, 16), (True, 4)}
    for option in alternatives:
        torch.testing.assert_close(launch_choice(option, x, weight), want)
    with_cuda = candidates(3, weight, cuda=True)
    assert with_cuda[-1]["family"] == "cuda_gemv"
    assert candidates(3, weight, cuda=True, epilogue=True)[-1]["family"] == "triton"


def test_tune_shape_measures_and_stores_a_choice(tmp_path):
    cache = AutotuneCache.for_device("cpu-interpreter", tmp_path)
    weight = _weight()

    def wall(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    choice = tune_shape(cache, 2, weight, wall, choices=candidates(2, weight)[:3])
    assert cache.get(cache_key(2, weight)) == choice
    assert Config(**{k: v for k, v in choice.items() if k != "family"})  # a valid config


def test_the_binder_follows_the_cache(captured, tmp_path, monkeypatch):
    from kompakt.codegen.dequant_matmul import bind as bind_module

    monkeypatch.setenv("KOMPAKT_CACHE_DIR", str(tmp_path))
    forced = {
        "family": "triton", "regime": "gemv", "block_m": 16, "block_n": 16, "block_k": 16,
        "split_k": 3, "num_warps": 4, "num_stages": 2,
    }  # fmt: skip
    cache = AutotuneCache.for_device("cpu-interpreter")
    for n, k in ((64, 64), (128, 64), (64, 128), (32, 64)):  # the tiny Llama's projections
        # the example shape (2, 8) gives every projection 16 rows
        key = bucket("dequant_matmul", m=16, n=n, k=k, g=16, b=4) + "|float32"
        cache.put(key, forced, 1e-6, 1)
    cache.save()
    used = []

    def spy(choice, *args, **kwargs):
        used.append(choice)
        return launch_choice(choice, *args, **kwargs)

    monkeypatch.setattr(bind_module, "launch_choice", spy)
    pipeline = (
        "canonicalize,infer-shapes,quantize-weights{bits=4,group-size=16},fuse-dequant-matmul"
    )
    common = dict(target="a100-w4", pipeline=pipeline, progress=False, device="cpu")
    triton = kompakt.compile(captured("llama"), backend="triton", **common)
    reference = kompakt.compile(captured("llama"), backend="reference", **common)
    ids = tokens(EXAMPLE_SHAPE)
    out, want = triton(ids), reference(ids)
    torch.testing.assert_close(out[0], want[0], rtol=1e-4, atol=1e-5)
    assert used and forced in used  # cached shapes take the measured choice
