"""mixed-precision: the allocation meets the budget with the least predicted loss; the pass
quantizes each layer at its width, shows the widths, and beats uniform w4 at 4.5 bits."""

import itertools

import pytest
import torch
from conftest import OTHER_SHAPE, tokens

import kompakt
from kompakt.passes.quantize.mixed_precision import MixedPrecision, allocate_bits


def brute_force(losses, sizes, widths, average):
    best = None
    for choice in itertools.product(widths, repeat=len(sizes)):
        if sum(b * n for b, n in zip(choice, sizes, strict=True)) > average * sum(sizes) + 1e-9:
            continue
        total = sum(loss[b] for loss, b in zip(losses, choice, strict=True))
        if best is None or total < best[0]:
            best = (total, list(choice))
    return best


def convex_losses(seed, layers):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        s = float(torch.rand(1, generator=g)) * 10 + 0.1
        out.append({b: s * 4.0 ** (-b) for b in (2, 3, 4, 8)})  # error /4 per extra bit
    return out


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_on_convex_losses(seed):
    losses = convex_losses(seed, 5)
    sizes = [64, 64, 128, 256, 64]
    widths = [2, 3, 4, 8]
    chosen = allocate_bits(losses, sizes, widths, 4.5)
    assert sum(b * n for b, n in zip(chosen, sizes, strict=True)) <= 4.5 * sum(sizes)
    total = sum(loss[b] for loss, b in zip(losses, chosen, strict=True))
    optimum, _ = brute_force(losses, sizes, widths, 4.5)
    assert total <= optimum * 1.35  # greedy on the hull: near the knapsack optimum
    # the most sensitive layer per parameter never gets fewer bits than the least sensitive
    per_param = [loss[2] / n for loss, n in zip(losses, sizes, strict=True)]
    assert chosen[per_param.index(max(per_param))] >= chosen[per_param.index(min(per_param))]


def test_allocation_edges():
    losses = [{3: 5.0, 4: 1.0, 8: 0.1}, {3: 1.0, 4: 0.5, 8: 0.4}]
    assert allocate_bits(losses, [10, 10], [3, 4, 8], 3.0) == [3, 3]  # budget = narrowest
    assert allocate_bits(losses, [10, 10], [3, 4, 8], 8.0) == [8, 8]  # budget = widest
    assert allocate_bits(losses, [10, 10], [3, 4, 8], 3.5) == [4, 3]  # the sensitive one first
    flat = [{3: 1.0, 4: 1.0, 8: 1.0}]  # more bits do not help: stay narrow
    assert allocate_bits(flat, [10], [3, 4, 8], 8.0) == [3]


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="candidates"):
        MixedPrecision(candidates=(5,))
    with pytest.raises(ValueError, match="average_bits"):
        MixedPrecision(average_bits=9.0)
    with pytest.raises(ValueError, match="sensitivity"):
        MixedPrecision(sensitivity="fisher")
    with pytest.raises(ValueError, match="method"):
        MixedPrecision(method="awq")


@pytest.mark.parametrize(("sensitivity", "method"), [("hessian", "gptq"), ("output", "rtn")])
def test_pass_on_a_tiny_llama_meets_the_budget_and_reports_widths(captured, sensitivity, method):
    calibration = [(tokens((2, 16), seed=s),) for s in range(3)]
    pipeline = (
        f"canonicalize,mixed-precision{{average-bits=4.5,candidates=[3,4,8],group-size=32,method={method},"
        f"sensitivity={sensitivity}}}"
    )
    compiled = kompakt.compile(
        captured("llama"), pipeline=pipeline, calibration=calibration, backend="reference"
    )
    result = compiled.report().passes[-1].result
    records = result.records
    assert len(records) == 14
    sizes = [r["shape"][0] * r["shape"][1] for r in records]
    bits = [r["bits"] for r in records]
    assert set(bits) <= {3, 4, 8} and len(set(bits)) > 1  # really mixed
    assert sum(b * n for b, n in zip(bits, sizes, strict=True)) <= 4.5 * sum(sizes) + 1e-6
    assert result.stats["average_bits"] <= 4.5
    assert all(r["scheme"].startswith(f"int{r['bits']} g32") for r in records)
    text = compiled.render_report(verbose=True)
    assert "int8 g32" in text and "int3 g32" in text  # the widths are in the report
    assert torch.isfinite(compiled(tokens(OTHER_SHAPE))).all()


def test_single_sample_and_zero_weights_stay_finite(captured):
    model = captured("llama").clone()
    weight = next(v for v in model.graph.initializers.values() if "down_proj" in (v.name or ""))
    array = weight.const_value.numpy().copy()
    array[:] = 0.0
    import onnx_ir as ir

    weight.const_value = ir.tensor(array, name=weight.name)
    compiled = kompakt.compile(
        model,
        pipeline="canonicalize,mixed-precision{group-size=32}",
        calibration=[(tokens((1, 1)),)],
        backend="reference",
    )
    assert torch.isfinite(compiled(tokens(OTHER_SHAPE))).all()


def test_fractional_bits_token_means_mixed_precision():
    from kompakt.targets.target import Target

    assert str(Target.parse("a100-w4.5").default_pipeline(calibrated=True)) == (
        "canonicalize,mixed-precision{average-bits=4.5,group-size=128,symmetric=false,method=gptq},"
        "infer-shapes,merge-projections,fuse-dequant-matmul,fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise"
    )
    assert ",method=rtn}" in str(Target.parse("cpu-w3.5-g64-rtn").default_pipeline())
    with pytest.raises(kompakt.TargetError, match="gptq or rtn"):
        Target.parse("cpu-w4.5-awq").default_pipeline()
    with pytest.raises(kompakt.TargetError, match="between 2 and 8"):
        Target.parse("cpu-w8.5")


def test_mixed_precision_target_needs_calibration(captured):
    with pytest.raises(kompakt.CalibrationError, match="mixed-precision"):
        kompakt.compile(captured("llama"), target="cpu-w4.5")
