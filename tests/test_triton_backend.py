"""The triton backend end to end: fused groups as Triton kernels (interpreter on CPU) vs reference."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens

import kompakt
from kompakt.errors import CodegenError, KompaktError
from kompakt.runtime import triton_backend
from kompakt.runtime.triton_backend import triton_available

pytest.importorskip("triton")

FUSED = "canonicalize,infer-shapes,quantize-weights{bits=4,group-size=16},fuse-dequant-matmul"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _pair(captured, name, pipeline=FUSED):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(target="a100-w4", pipeline=pipeline, progress=False, device=device)
    triton = kompakt.compile(captured(name), backend="triton", **common)
    reference = kompakt.compile(captured(name), backend="reference", **common)
    return triton, reference


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_tiny_model_on_triton_matches_reference(captured, name):
    triton, reference = _pair(captured, name)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        got, want = _first(triton(ids)), _first(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
    summary = triton._backend.summary()
    expected = 14 if name == "llama" else 13  # BERT: 6 per layer and the pooler
    assert f"dequant_matmul x{expected}" in summary
    assert "through torch:" in summary and "Softmax" in summary  # unfused ops are listed


def test_groups_a_family_rejects_run_their_body_through_torch(captured, monkeypatch):
    def reject(node, device):
        raise CodegenError("group size 24 is not a multiple of 16")

    monkeypatch.setattr(triton_backend, "binder_for", lambda pattern: reject)
    triton, reference = _pair(captured, "llama")
    ids = tokens(EXAMPLE_SHAPE)
    torch.testing.assert_close(_first(triton(ids)), _first(reference(ids)), rtol=1e-5, atol=1e-6)
    summary = triton._backend.summary()
    assert "triton kernels: none" in summary
    assert "FusedKernel[dequant_matmul] x14" in summary
    assert "multiple of 16" in summary  # the reason is reported per node


def test_without_a_gpu_or_the_interpreter_the_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_available(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_unknown_backend_lists_triton(captured):
    with pytest.raises(KompaktError, match="triton"):
        kompakt.compile(captured("llama"), target="a100", backend="tensorrt", progress=False)
