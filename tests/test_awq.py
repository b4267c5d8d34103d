"""AWQ: the searches, the scale folding (exact in float), and the pass end to end."""

import pytest
import torch
from conftest import OTHER_SHAPE, tokens

import kompakt
from kompakt.ir.tensors import from_torch, to_torch
from kompakt.passes.base import CompileContext
from kompakt.passes.cleanup.canonicalize import Canonicalize
from kompakt.passes.quantize.awq_math import linear_error, search_clip, search_scales
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.passes.quantize.layers import weight_sites
from kompakt.passes.quantize.scale_folding import divide_input
from kompakt.runtime.plan import ExecutionPlan


def salient_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    x[:, :6] *= 20  # a few salient input channels, as in real LLM activations
    w = torch.randn(128, 64, generator=g) * 0.05
    return w, x


def test_scale_search_protects_salient_channels():
    w, x = salient_layer()
    grid = Grid(4, 32, False)
    s, alpha, error, rtn_error = search_scales([w], x.abs().mean(0), grid, linear_error(x, [w]))
    assert alpha > 0 and error < rtn_error
    assert s[:6].min() > s[6:].max()  # salient channels scaled up the most


def test_clip_search_never_increases_the_error():
    w, x = salient_layer(1)
    grid = Grid(3, 32, True)
    clipped = search_clip(w, x, grid)
    assert (clipped.abs() <= w.abs() + 1e-7).all()
    before = (x @ (quantize_rtn(w, grid).dequantize() - w)).pow(2).mean()
    after = (x @ (quantize_rtn(clipped, grid).dequantize() - w)).pow(2).mean()
    assert after <= before


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "bert"])
def test_dividing_inputs_is_exact_in_float(captured, name):
    """Scale every weight's input channels by s and divide its input by s: same function."""
    model = captured(name).clone()
    Canonicalize().run(model, CompileContext())
    ids = tokens(OTHER_SHAPE, seed=3)
    (before,) = ExecutionPlan(model).run({"input_ids": ids})[:1]
    allowed = {id(n) for n in model.graph}
    how = []
    groups = {}
    for site in weight_sites(model.graph):
        groups.setdefault(id(site.matmuls[0].inputs[0]), []).append(site)
    for members in groups.values():
        k = to_torch(members[0].weight.const_value).shape[0]
        s = torch.linspace(0.5, 2.0, k)
        for site in members:
            w = to_torch(site.weight.const_value)
            site.weight.const_value = from_torch(w * s[:, None], name=site.weight.name)
        consumers = [m for site in members for m in site.matmuls]
        how.append(
            divide_input(model.graph, members[0].matmuls[0].inputs[0], s, consumers, allowed)
        )
    (after,) = ExecutionPlan(model).run({"input_ids": ids})[:1]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    if name == "llama":
        # RMSNorm weights (two per layer, and the final norm before lm_head) and up_proj (through
        # SwiGLU) take the scales; o_proj's input comes out of attention and gets a Mul
        assert how.count("folded into Mul") == 5
        assert how.count("folded into MatMul (through Mul)") == 2
        assert how.count("explicit Mul") == 2


def test_awq_pass_on_a_tiny_llama(captured):
    calibration = [(tokens((4, 16), seed=s),) for s in range(4)]
    compiled = kompakt.compile(
        captured("llama"), target="cpu-w4-g32-awq", calibration=calibration, backend="reference"
    )
    record = compiled.report().passes[-1]
    assert record.result.stats["quantized"] == 14
    assert record.result.stats["input_scales folded into Mul"] == 4
    assert all(r["output_error"] <= r["rtn_output_error"] * 1.0001 for r in record.result.records)
    assert torch.isfinite(compiled(tokens(OTHER_SHAPE))).all()
