"""GPTQ: the solver beats round-to-nearest on its own objective; degenerate inputs stay finite."""

import pytest
import torch
from conftest import OTHER_SHAPE, tokens

import kompakt
from kompakt.passes.quantize.gptq_math import gptq_quantize, hessian_error
from kompakt.passes.quantize.grid import Grid, quantize_rtn


def layer(k=128, n=48, tokens_=512, seed=0):
    """A weight and inputs with correlated channels, a few of them loud (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens_, k, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(k, n, generator=g) * 0.05
    return w, x


def output_error(w, approx, x):
    return float((x @ w - x @ approx).pow(2).mean())


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, -1), (3, 64), (2, 32), (8, -1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, group, symmetric, act_order):
    w, x = layer()
    h = x.T @ x / x.shape[0]
    grid = Grid(bits, group, symmetric)
    ours, _ = gptq_quantize(w, h, grid, block_size=32, act_order=act_order)
    rtn = quantize_rtn(w, grid)
    assert int(ours.q.min()) >= grid.qmin and int(ours.q.max()) <= grid.qmax
    assert ours.scale.shape == rtn.scale.shape  # same contiguous group layout as RTN
    assert output_error(w, ours.dequantize(), x) < 0.8 * output_error(w, rtn.dequantize(), x)
    assert hessian_error(w, ours.dequantize(), h) < hessian_error(w, rtn.dequantize(), h)


@pytest.mark.parametrize("act_order", [True, False])
def test_returned_loss_is_the_damped_hessian_error(act_order):
    w, x = layer(k=96, n=24)
    h = x.T @ x / x.shape[0]
    damp = 0.01
    qw, loss = gptq_quantize(
        w, h.clone(), Grid(4, 32, False), block_size=32, damp=damp, act_order=act_order
    )
    damped = h + torch.eye(96) * damp * h.diagonal().mean()
    delta = w - qw.dequantize()
    expected = float(((damped @ delta) * delta).sum())
    assert loss == pytest.approx(expected, rel=1e-3)


def test_overwriting_the_hessian_gives_the_same_result():
    w, x = layer(k=64, n=16)
    h = x.T @ x / x.shape[0]
    kept, _ = gptq_quantize(w, h, Grid(4, 32, False))
    scratch = h.clone()
    reused, _ = gptq_quantize(w, scratch, Grid(4, 32, False), overwrite_hessian=True)
    assert torch.equal(kept.q, reused.q) and torch.equal(kept.scale, reused.scale)
    assert torch.equal(h, x.T @ x / x.shape[0])  # the caller's H is untouched without the flag
    assert not torch.equal(scratch, h)  # ... and reused as scratch with it


def test_dead_inputs_zero_weights_and_one_sample_stay_finite():
    w, x = layer(k=64, n=16)
    w[:, 3] = 0.0  # an all-zero output channel
    w[5] = 0.0  # an all-zero input row
    x = x[:1].clone()  # one token: H has rank 1
    x[:, 7] = 0.0  # a dead input channel
    h = x.T @ x
    for symmetric in (True, False):
        qw, _ = gptq_quantize(w, h, Grid(4, 32, symmetric))
        out = qw.dequantize()
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, 3], torch.zeros(64))
        assert torch.equal(out[7], torch.zeros(16))  # dead input: weight zeroed


def test_constant_activations():
    w, _ = layer(k=64, n=16)
    x = torch.ones(32, 64) * 0.5
    qw, _ = gptq_quantize(w, x.T @ x / 32, Grid(4, 32, False))
    assert torch.isfinite(qw.dequantize()).all()


def test_k_not_a_multiple_of_the_group():
    w, x = layer(k=100, n=16)
    qw, _ = gptq_quantize(w, x.T @ x / x.shape[0], Grid(4, 32, False))
    assert qw.scale.shape == (4, 16)
    assert output_error(w, qw.dequantize(), x) < output_error(
        w, quantize_rtn(w, Grid(4, 32, False)).dequantize(), x
    )


def test_bad_hessian_is_refused():
    w, _ = layer(k=32, n=8)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, torch.eye(16), Grid())
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, torch.full((32, 32), float("nan")), Grid())


def test_gptq_pass_on_a_tiny_llama(captured, tiny):
    calibration = [(tokens((4, 16), seed=s),) for s in range(4)]
    compiled = kompakt.compile(
        captured("llama"), target="cpu-w4-g32-gptq", calibration=calibration, backend="reference"
    )
    assert compiled.pipeline == "canonicalize,gptq{bits=4,group-size=32,symmetric=false}"
    record = compiled.report().passes[-1]
    assert (
        record.result.stats["quantized"] == 14 and record.result.stats["calibration_batches"] == 4
    )
    assert all(r["output_error"] < r["rtn_output_error"] for r in record.result.records)
    dq = [n for n in compiled.ir.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14 and all(
        '"method": "gptq"' in n.metadata_props["kompakt.quant"] for n in dq
    )
    out = compiled(tokens(OTHER_SHAPE))
    assert torch.isfinite(out).all()


def test_plain_w4_uses_gptq_when_calibration_is_given(captured):
    calibration = [(tokens((2, 8), seed=1),)]
    with_data = kompakt.compile(captured("bert"), target="cpu-w4", calibration=calibration)
    without = kompakt.compile(captured("bert"), target="cpu-w4")
    assert ",gptq{" in with_data.pipeline and ",quantize-weights{" in without.pipeline
