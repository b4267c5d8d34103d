"""The GPU benchmark scripts without a GPU: they import, --help works, a run says it needs CUDA, and
their arithmetic and weight conversions are right (made-up timings, small CPU tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder at the root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_autotune, gpu_decode, gpu_kernels  # noqa: E402
from kompakt.codegen.dequant_matmul import dequant_matmul_reference, pack, unpack  # noqa: E402

SCRIPTS = ["benchmarks.gpu_kernels", "benchmarks.gpu_decode", "benchmarks.gpu_autotune"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("module", SCRIPTS)
def test_help(module):
    result = _run(module, "--help")
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--out" in result.stdout


@pytest.mark.parametrize("module", SCRIPTS)
def test_without_cuda_exits_nonzero_saying_why(module, tmp_path):
    result = _run(module, "--quick", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "a CUDA GPU is needed" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_autotune_gain_arithmetic():
    assert gpu_autotune.gain(3e-5, 1e-5) == pytest.approx(3.0)
    assert gpu_autotune.gain(1e-5, 0.0) != gpu_autotune.gain(1e-5, 0.0)  # nan, not a crash


def test_bandwidth_and_speedup_arithmetic():
    assert gpu_kernels.bandwidth(3e9, 1.0) == pytest.approx(3e12)  # 3 GB in 1 ms
    assert gpu_kernels.fraction_of_copy(3e9, 1.0, 4e12) == pytest.approx(0.75)
    assert gpu_kernels.fraction_of_copy(3e9, None, 4e12) is None
    assert gpu_kernels.speedup(0.30, 0.10) == pytest.approx(3.0)
    assert gpu_kernels.speedup(None, 0.10) is None and gpu_kernels.speedup(0.3, None) is None
    row = {"triton_ms": 0.02, "cuda_gemv_ms": 0.015}
    assert gpu_kernels.kompakt_ms(row, "best") == 0.015
    assert gpu_kernels.kompakt_ms(row, "triton") == 0.02
    assert gpu_kernels.kompakt_ms({"triton_ms": 0.02}, "cuda_gemv") is None
    assert gpu_kernels.kompakt_ms({}, "best") is None


def _row(k, m, ms, fp16_ms, int4_ms=None, copy_fraction=None, copy_bps=4e12):
    row = {"k": k, "m": m, "triton_ms": ms, "fp16_ms": fp16_ms, "int4_ms": int4_ms, "notes": []}
    # bytes chosen so that the row moves copy_fraction of the copy bandwidth
    row["bytes"] = (copy_fraction or 0.5) * copy_bps * ms * 1e-3
    return row


def test_targets_pass_fail_and_worst_case():
    copy = 4e12
    rows = [
        _row(8192, 1, 0.020, 0.060, int4_ms=0.030, copy_fraction=0.80),
        _row(16384, 1, 0.060, 0.180, int4_ms=0.050, copy_fraction=0.78),  # 3.0x fp16, 0.83x int4
        _row(16384, 16, 0.080, 0.150),  # 1.9x fp16: fails "2x for every M <= 16"
        _row(16384, 64, 0.200, 0.180),  # M > 16: no target covers it
    ]
    by_name = {t["target"]: t for t in gpu_kernels.evaluate_targets(rows, "triton", copy)}
    bw, big, int4, small = (by_name[words] for words, *_ in gpu_kernels.TARGETS)
    assert bw["status"] == "pass" and bw["worst"] == pytest.approx(0.78)
    assert bw["at"] == "K=N=16384 M=1"
    assert big["status"] == "pass" and big["worst"] == pytest.approx(3.0)
    assert int4["status"] == "fail" and int4["worst"] == pytest.approx(0.05 / 0.06)
    assert small["status"] == "fail" and small["at"] == "K=N=16384 M=16"
    # no CUDA C GEMV time anywhere: every target is "n/a" for it, not a pass
    na = gpu_kernels.evaluate_targets(rows, "cuda_gemv", copy)
    assert {t["status"] for t in na} == {"n/a"}
    text = gpu_kernels.render(rows, by_name.values(), _env(), copy, ["a note"])
    assert "[FAIL] triton: ≥ 1.0x torch int4 at M = 1 (worst 0.83x at K=N=16384 M=1)" in text
    assert "| 16384 | 1 | 60.0 |" in text and "- a note" in text


def _env():
    return {"device": "made-up GPU", "arch": "sm_90", "torch": "x", "triton": "y", "date": "d"}


def test_decode_arithmetic():
    stamps = [10.0, 10.01, 10.02, 10.05]  # 3 decode steps in 50 ms
    assert gpu_decode.decode_tokens_per_s(stamps, batch=1) == pytest.approx(60.0)
    assert gpu_decode.decode_tokens_per_s(stamps, batch=8) == pytest.approx(480.0)
    assert gpu_decode.ms_per_step(480.0, 8) == pytest.approx(1000 / 60)
    # 128 tokens in 1.30 s, 1 token (the prefill) in 0.03 s: 127 decode tokens in 1.27 s
    assert gpu_decode.decode_tokens_per_s_from_totals(1.30, 0.03, 128, 1, 1) == pytest.approx(100)
    with pytest.raises(ValueError):
        gpu_decode.decode_tokens_per_s([1.0], 1)
    with pytest.raises(ValueError):
        gpu_decode.decode_tokens_per_s_from_totals(0.02, 0.03, 128, 1, 1)
    rows = [
        {"batch": 1, "variant": "torch eager fp16", "tokens_per_s": 30.0},
        {"batch": 1, "variant": "torch.compile fp16", "tokens_per_s": 90.0},
    ]
    text = gpu_decode.render(rows, _env() | {"transformers": "z"}, 4, [gpu_decode.NOT_IMPLEMENTED])
    assert "| 1 | torch.compile fp16 | 90.0 | 11.11 | 3.00x |" in text
    assert "4 of 32 layers" in text and "not implemented in this build" in text


def test_gpu_preset_names():
    assert gpu_decode.gpu_preset("NVIDIA H200") == "h200"
    assert gpu_decode.gpu_preset("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_decode.gpu_preset("NVIDIA H100 80GB HBM3") == "h100"


def test_random_weight_and_tinygemm_layout():
    packed = gpu_kernels.random_packed(256, 16, "cpu")
    q = gpu_kernels.nibbles(packed)
    assert q.shape == (256, 16) and int(q.min()) >= 0 and int(q.max()) <= 15
    repacked = pack(q.to(torch.uint8), packed.scales.float(), packed.zeros.float(), 4, 128)
    assert torch.equal(repacked.qweight, packed.qweight)  # our layout read back exactly
    # uint8 form: k = 2j in the high nibble of byte j (what the CUDA conversion kernel reads)
    u8 = gpu_kernels.tinygemm_weight(q, "uint8")
    assert u8.dtype == torch.uint8 and u8.shape == (16, 128)
    assert torch.equal((u8 >> 4).int(), q.t()[:, 0::2]) and torch.equal(
        (u8 & 0xF).int(), q.t()[:, 1::2]
    )
    assert torch.equal(gpu_kernels.tinygemm_weight(q, "int32"), q.t())


def test_tinygemm_scales_and_zeros_give_our_weight():
    """torch's CPU int4 kernel reads the same (q, scale, zero) convention as the CUDA one."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None:
        pytest.skip("this torch has no CPU int4 kernel")
    packed = gpu_kernels.random_packed(256, 16, "cpu", seed=3)
    q = gpu_kernels.nibbles(packed)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        gpu_kernels.tinygemm_weight(q, "int32"), 2
    )
    sz = gpu_kernels.tinygemm_scales_zeros(packed, torch.float32)
    x = torch.randn(3, 256)
    ref = x @ unpack(packed)
    y = op(x, weight, 128, sz)
    assert gpu_kernels.relative_error(y, ref) < 1e-4
    assert gpu_kernels.relative_error(dequant_matmul_reference(x, packed), ref) < 1e-6


def test_hf_decode_timing_runs_on_a_tiny_model():
    model = gpu_decode.llama(
        2, "cpu", hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100,
    ).float()  # fmt: skip
    prompt = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    assert gpu_decode.hf_decode_tokens_per_s(model, prompt, 5) > 0


def test_kompakt_decode_rows_run_end_to_end_in_the_interpreter(monkeypatch):
    """gpu_decode's kompakt rows, as the GPU run takes them (compile for the preset with the
    triton backend and a static cache, then timed generate calls), on a one-layer model in
    Triton's interpreter: a row with tokens/s for fp16 and w4, not an error row."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(gpu_decode, "PROMPT", 8)
    model = gpu_decode.llama(
        1, "cpu", hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100,
    ).float()  # fmt: skip
    prompts = {1: torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))}
    rows = gpu_decode.kompakt_rows(model, prompts, 3, 1, "h100")
    assert [r["variant"] for r in rows] == ["kompakt fp16", "kompakt w4"], rows
    assert all(r.get("tokens_per_s", 0) > 0 for r in rows), rows


def _gpu_all(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs benchmarks/gpu_all.sh with a stand-in python that claims a GPU and logs each call."""
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    environ = os.environ | {"PYTHON": str(stub), "OUT": str(out)} | env
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_all.sh")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_gpu_all_runs_the_targets_first_each_step_logged(tmp_path):
    result, calls = _gpu_all(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    modules = [c.split()[1] for c in calls]
    assert modules == [
        "benchmarks.gpu_kernels",
        "benchmarks.gpu_decode",
        "pytest",
        "benchmarks.gpu_autotune",
    ]
    assert "--batches 1" in calls[1] and "--no-cuda-gemv" in calls[3]
    logs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert logs == ["gpu-autotune.log", "gpu-decode.log", "gpu-kernels.log", "gpu-tests.log"]


def test_gpu_all_skips_steps_past_its_deadline_and_takes_chosen_steps(tmp_path):
    result, calls = _gpu_all(tmp_path, DEADLINE="30")
    assert result.returncode == 1 and calls == []
    assert "kernels skipped: 30 s left" in result.stdout
    result, calls = _gpu_all(tmp_path, STEPS="tests bogus")
    assert [c.split()[1] for c in calls] == ["pytest"]
    assert result.returncode == 2 and "unknown step 'bogus'" in result.stdout


def test_gpu_all_without_a_gpu_exits_2(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    script = str(ROOT / "benchmarks" / "gpu_all.sh")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA GPU visible" in result.stderr
