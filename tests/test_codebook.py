"""codebook: the weighted k-means, the lookup IR it writes, and the pass on a tiny llama."""

import json

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import OTHER_SHAPE, tokens

import kompakt
import kompakt.passes.quantize.codebook  # noqa: F401  (registers the pass)
from kompakt import KompaktError
from kompakt.ir.tensors import from_torch, to_torch
from kompakt.passes.quantize.codebook import KEEP_UNFOLDED_KEY, Codebook
from kompakt.passes.quantize.codebook_math import (
    _weighted_quantiles,
    lookup,
    sensitivities,
    weighted_error,
    weighted_kmeans,
)
from kompakt.passes.quantize.emit import QUANT_KEY
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.runtime.plan import ExecutionPlan

CALIBRATION = [(tokens((4, 16), seed=s),) for s in range(3)]


def layer(k=128, n=48, seed=0):
    """A weight and skewed sensitivities: a few input rows matter far more (loud channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.05
    s = torch.rand(k, generator=g) ** 4 + 0.01
    s[:6] *= 50
    return w, s


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_kmeans_lowers_the_weighted_objective(bits):
    w, s = layer()
    codebook, indices = weighted_kmeans(w, s, bits, iterations=30)
    assert codebook.shape == (1 << bits, 48) and indices.dtype == torch.uint8
    assert int(indices.max()) < 1 << bits
    assert (codebook[1:] >= codebook[:-1]).all()  # sorted per channel
    ours = weighted_error(w, lookup(codebook, indices), s)
    # below its own deterministic start, plain (unweighted) k-means, and RTN at the same bits
    start = _weighted_quantiles(w.T.contiguous(), s.expand(48, -1), 1 << bits).T
    at_start = weighted_error(w, lookup(start, (w[:, None, :] - start).abs().argmin(1)), s)
    plain = weighted_kmeans(w, torch.ones(128), bits, iterations=30)
    rtn = quantize_rtn(w, Grid(bits, -1, False)).dequantize()
    assert ours < at_start
    assert ours < weighted_error(w, lookup(*plain), s)
    assert ours < 0.8 * weighted_error(w, rtn, s)


def test_few_distinct_values_are_exact_and_zero_channels_stay_zero():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 5, generator=g)
    w[:, 0] = 0.0  # all-zero channel
    w[:, 1] = torch.tensor([0.0, 1.0])[torch.randint(0, 2, (64,), generator=g)]
    w[:, 1][:3] = -7.0  # a rare value the quantile start misses
    w[:, 2] = torch.arange(64).float() % 8 - 3.5  # exactly 8 distinct values
    w[:, 3] = 0.25  # constant
    s = torch.rand(64, generator=g) + 0.1
    codebook, indices = weighted_kmeans(w, s, bits=3, iterations=5)
    approx = lookup(codebook, indices)
    assert torch.isfinite(codebook).all()
    torch.testing.assert_close(approx[:, :4], w[:, :4], rtol=0, atol=0)
    assert torch.equal(codebook[:, 0], torch.zeros(8))
    generic = (approx[:, 4] - w[:, 4]).abs()  # a Gaussian channel: close, not exact
    assert 0 < generic.mean() < 0.15 and generic.max() < 0.7


def test_degenerate_sensitivities_never_give_nan():
    w, _ = layer(k=32, n=8)
    w[3] = 0.0  # an all-zero input row
    for diagonal in (torch.zeros(32), torch.ones(32), torch.eye(32)[0]):  # dead / const / one hot
        s = sensitivities(diagonal)
        assert (s > 0).all()
        codebook, indices = weighted_kmeans(w, s, bits=2, iterations=10)
        assert torch.isfinite(lookup(codebook, indices)).all()
    with pytest.raises(ValueError, match="NaN"):
        bad = w.clone()
        bad[0, 0] = float("nan")
        weighted_kmeans(bad, torch.ones(32), 3)


def test_excluded_weights_do_not_pull_on_the_codebook():
    w, s = layer(k=64, n=4)
    excluded = torch.zeros_like(w, dtype=torch.bool)
    excluded[:2] = True
    moved = w.clone()
    moved[:2] = 100.0  # far away: would take a codebook entry of every channel
    free = weighted_kmeans(w[2:], s[2:], bits=2, iterations=20)
    masked = weighted_kmeans(moved, s, bits=2, iterations=20, exclude=excluded)
    torch.testing.assert_close(masked[0], free[0])
    every_row_out = torch.ones_like(w, dtype=torch.bool)
    assert torch.isfinite(weighted_kmeans(w, s, 2, 5, exclude=every_row_out)[0]).all()


@pytest.mark.parametrize(
    ("option", "value"),
    [("bits", 5), ("bits", 1), ("iterations", -1), ("outliers", 0.5), ("outliers", -0.1)],
)
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        Codebook(**{option: value})


def test_needs_calibration_and_refuses_nan_data(captured):
    with pytest.raises(KompaktError, match="calibration"):
        kompakt.compile(captured("llama"), pipeline="canonicalize,codebook")
    # a NaN in the embedding table reaches every MatMul input on these tokens
    model = captured("llama").clone()
    table = next(v for v in model.graph.initializers.values() if "embed" in v.name)
    poisoned = to_torch(table.const_value).clone()
    poisoned[:] = float("nan")
    table.const_value = from_torch(poisoned, name=table.name)
    with pytest.raises(KompaktError, match="NaN"):
        kompakt.compile(model, pipeline="canonicalize,codebook", calibration=CALIBRATION)


@pytest.fixture(scope="module")
def compiled_llama(captured):
    return {
        pipeline: kompakt.compile(
            captured("llama"),
            pipeline=f"canonicalize,{pipeline}",
            calibration=CALIBRATION if "codebook" in pipeline else None,
            backend="reference",
        )
        for pipeline in (
            "codebook{bits=3}",
            "codebook{bits=3,outliers=0.01}",
            "quantize-weights{bits=3,group-size=-1}",
        )
    }


def test_codebook_pass_on_a_tiny_llama(captured, compiled_llama):
    ours = compiled_llama["codebook{bits=3}"]
    rtn = compiled_llama["quantize-weights{bits=3,group-size=-1}"]
    result = ours.report().passes[-1].result
    assert result.stats["quantized"] == 14 and result.stats["kept"] == 1  # lm_head kept
    assert all(r["output_error"] < r["rtn_output_error"] for r in result.records)
    record = result.records[0]
    k, n = record["shape"]
    assert record["bytes_after"] == k * n // 2 + 8 * n * 2  # uint4 indices + f16 table
    graph = ours.ir.graph
    lookups = [node for node in graph if node.op_type == "GatherElements"]
    assert len(lookups) == 14 and not any(n.op_type == "DequantizeLinear" for n in graph)
    assert json.loads(lookups[0].metadata_props[QUANT_KEY])["method"] == "codebook"
    rebuilding = lookups + [v.producer() for n in lookups for v in n.inputs if v.producer()]
    assert len(rebuilding) == 14 * 3  # GatherElements, Cast of the table, Cast of the indices
    assert all(n.metadata_props.get(KEEP_UNFOLDED_KEY) == "codebook" for n in rebuilding)
    indices = lookups[0].inputs[1].producer().inputs[0]
    assert indices.dtype == ir.DataType.UINT4

    x = tokens(OTHER_SHAPE, seed=5)
    reference = kompakt.compile(captured("llama"), pipeline="canonicalize", backend="reference")
    expected = reference(x)

    def error(model):
        return float((model(x) - expected).pow(2).mean() / expected.pow(2).mean())

    assert 0 < error(ours) < 0.1
    assert error(ours) < error(rtn)  # same bits per weight, both per-channel


def test_outliers_are_kept_exact_in_a_sparse_part(compiled_llama):
    dense = compiled_llama["codebook{bits=3}"].report().passes[-1].result.records
    split = compiled_llama["codebook{bits=3,outliers=0.01}"].report().passes[-1].result.records
    for plain, record in zip(dense, split, strict=True):
        k, n = record["shape"]
        assert record["outliers"] == round(0.01 * k * n)
        assert record["bytes_after"] == plain["bytes_after"] + record["outliers"] * (4 + 4) + 24
        assert record["output_error"] < plain["output_error"]
    graph = compiled_llama["codebook{bits=3,outliers=0.01}"].ir.graph
    assert sum(node.op_type == "ScatterElements" for node in graph) == 14


@pytest.mark.parametrize("pipeline", ["codebook{bits=3}", "codebook{bits=3,outliers=0.01}"])
def test_export_runs_in_onnxruntime_like_the_reference(tmp_path, compiled_llama, pipeline):
    compiled = compiled_llama[pipeline]
    path = tmp_path / "codebook.onnx"
    compiled.export_onnx(path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = tokens(OTHER_SHAPE, seed=7)
    (ours,) = session.run(None, {"input_ids": x.numpy()})[:1]
    reference = compiled(x)
    torch.testing.assert_close(torch.from_numpy(ours), reference, rtol=1e-4, atol=1e-4)


def test_eight_bits_use_uint8_indices_and_run_the_graph(captured):
    compiled = kompakt.compile(
        captured("llama"),
        pipeline="canonicalize,codebook{bits=8,iterations=5,exclude=[*mlp*],only=[*layers.0.*]}",
        calibration=[(tokens((1, 1)),)],  # a single calibration token is enough to run
        backend="reference",
    )
    result = compiled.report().passes[-1].result
    assert result.stats["quantized"] == 4 and result.stats["kept"] == 3  # layer 0's attention
    assert all(r["sqnr_db"] > 35 for r in result.records)
    plan_inputs = {"input_ids": tokens(OTHER_SHAPE)}
    (out,) = ExecutionPlan(compiled.ir).run(plan_inputs)[:1]
    assert torch.isfinite(out).all()
    lookup_node = next(n for n in compiled.ir.graph if n.op_type == "GatherElements")
    assert lookup_node.inputs[1].producer().inputs[0].dtype == ir.DataType.UINT8


def test_a_later_canonicalize_keeps_the_lookup(captured, compiled_llama):
    """fold-constants must not fold the table lookup back into a float weight."""
    again = kompakt.compile(
        compiled_llama["codebook{bits=3}"].ir, pipeline="canonicalize", backend="reference"
    )
    ops = [n.op_type for n in again.ir.graph]
    assert ops.count("GatherElements") == 14
    assert (
        again.report().size_after.bytes
        == compiled_llama["codebook{bits=3}"].report().size_after.bytes
    )
