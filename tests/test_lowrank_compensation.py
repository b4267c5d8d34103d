"""lowrank-compensation (LoRC): the factors, the IR it writes, and that it helps the model."""

import warnings

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import OTHER_SHAPE, tokens
from tiny_models import linear_model

import kompakt
import kompakt.passes.quantize.lowrank_compensation  # noqa: F401  (registers the passes)
from kompakt import KompaktError
from kompakt.errors import PipelineError
from kompakt.ir.tensors import to_torch
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.passes.quantize.lowrank_compensation import LowrankCompensation
from kompakt.passes.quantize.lowrank_math import lowrank_factors, quantize_factor, resolve_rank

RTN3 = "quantize-weights{bits=3,group-size=32}"


def compile_ir(model, pipeline: str, calibration=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "calibration given but no pass uses it"
        return kompakt.compile(
            model,
            pipeline=pipeline,
            calibration=calibration,
            backend="reference",
            progress=False,
            estimate_latency=False,
        )


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_factors_are_the_best_rank_r_approximation():
    torch.manual_seed(0)
    error = torch.randn(96, 40)
    a, b = lowrank_factors(error, 8)
    assert a.shape == (96, 8) and b.shape == (8, 40)
    s = torch.linalg.svdvals(error)
    residual = (error - a @ b).norm()
    torch.testing.assert_close(residual, s[8:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-4)
    # the factors share the singular values evenly, so int8 per-column rounding costs little
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-4, atol=1e-5)
    qa = quantize_factor(a).dequantize()
    assert relative(qa, a) < 0.01
    assert (resolve_rank(8, 96, 40), resolve_rank(0.25, 96, 40), resolve_rank(500, 96, 40)) == (
        8,
        10,
        40,
    )


def test_lorc_writes_the_correction_and_lowers_the_error():
    torch.manual_seed(0)
    w = torch.randn(128, 64) * 0.05
    x = torch.randn(32, 128)
    model = linear_model(w)
    rtn = compile_ir(model, f"canonicalize,{RTN3}")
    lorc = compile_ir(
        model, f"canonicalize,keep-float-weights,{RTN3},lowrank-compensation{{rank=16}}"
    )
    ops = [n.op_type for n in lorc.ir.graph]
    assert ops.count("MatMul") == 3 and ops.count("Add") == 1 and ops.count("DequantizeLinear") == 3
    factors = [n for n in lorc.ir.graph if n.name.endswith(("/lorc_a", "/lorc_b"))]
    assert [f.inputs[0].dtype for f in factors] == [ir.DataType.INT8] * 2
    assert [list(f.inputs[0].shape) for f in factors] == [[128, 16], [16, 64]]
    assert lorc.ir.graph.outputs[0].name == "y"  # the graph output keeps its name
    # y = x (Ŵ + A B) with every factor as written in the IR
    a, b = (
        to_torch(f.inputs[0].const_value).float() * to_torch(f.inputs[1].const_value)
        for f in factors
    )
    w_hat = quantize_rtn(w, Grid(3, 32, False)).dequantize()
    torch.testing.assert_close(lorc(x), x @ (w_hat + a @ b), rtol=1e-4, atol=1e-5)
    assert relative(lorc(x), x @ w) < 0.85 * relative(rtn(x), x @ w)
    (record,) = lorc.report().passes[-1].result.records
    assert record["weight_error_after"] < record["weight_error_before"]
    assert record["added_bytes"] == 128 * 16 + 16 * 4 + 16 * 64 + 64 * 4
    # nothing of the float weight is kept afterwards
    assert all(not n.meta for n in lorc.ir.graph) and not lorc.ir.graph.meta


def test_float16_factors_and_the_export_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(64, 48) * 0.05
    x = torch.randn(5, 64)
    int8 = compile_ir(
        linear_model(w), f"canonicalize,keep-float-weights,{RTN3},lowrank-compensation"
    )
    fp16 = compile_ir(
        linear_model(w),
        f"canonicalize,keep-float-weights,{RTN3},lowrank-compensation{{factor-bits=16}}",
    )
    assert sum(n.op_type == "Cast" for n in fp16.ir.graph) == 2
    torch.testing.assert_close(fp16(x), int8(x), rtol=0.02, atol=0.02 * float(int8(x).abs().max()))
    for compiled in (int8, fp16):
        path = compiled.export_onnx(tmp_path / "lorc.onnx")
        onnx.checker.check_model(onnx.load(path), full_check=True)
        options = ort.SessionOptions()  # unfused: ORT's MatMulNBits would quantize x to int8
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), compiled(x), rtol=1e-4, atol=1e-5)


def test_tiny_llama_with_calibration_and_the_onnxruntime_backend(captured, tiny):
    model = tiny("llama")
    ids = tokens(OTHER_SHAPE, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    calibration = [(tokens((1, 16), seed=7),)]  # a single calibration sample
    pipeline = "canonicalize,keep-float-weights,quantize-weights{bits=3,group-size=16}"
    rtn = compile_ir(captured("llama"), pipeline)
    lorc = compile_ir(captured("llama"), pipeline + ",lowrank-compensation", calibration)
    assert relative(lorc(ids), reference) < 0.85 * relative(rtn(ids), reference)
    result = lorc.report().passes[-1].result
    assert result.stats["compensated"] == 14
    for r in result.records:
        assert r["output_error_after"] < r["output_error_before"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_ort = kompakt.compile(
            lorc.ir, pipeline="canonicalize", progress=False, estimate_latency=False
        )  # onnxruntime backend: the int8 factors become MatMulNBits
    torch.testing.assert_close(on_ort(ids), lorc(ids), rtol=0.05, atol=0.05)


def test_degenerate_weights_and_activations_stay_finite():
    w = torch.randn(64, 32) * 0.05
    w[:8] = 0  # all-zero input rows
    w[:, :4] = 0  # all-zero output columns
    model = linear_model(w)
    constant = [(torch.ones(1, 64),)]  # one constant calibration sample
    compiled = compile_ir(
        model, f"canonicalize,keep-float-weights,{RTN3},lowrank-compensation{{rank=0.5}}", constant
    )
    x = torch.randn(3, 64)
    out = compiled(x)
    assert torch.isfinite(out).all() and bool((out[:, :4] == 0).all())
    (record,) = compiled.report().passes[-1].result.records
    assert record["rank"] == 16 and all(
        v == v for k, v in record.items() if k.endswith(("_before", "_after"))
    )
    zero = compile_ir(
        linear_model(torch.zeros(64, 32)),
        "canonicalize,keep-float-weights,quantize-weights,lowrank-compensation",
    )
    result = zero.report().passes[-1].result
    assert result.stats["compensated"] == 0 and "nothing to compensate" in result.notes[0]
    assert bool((zero(x) == 0).all())


def test_nan_calibration_is_refused_clearly():
    model = linear_model(torch.randn(64, 32))
    bad = torch.randn(2, 64)
    bad[0, 3] = float("nan")
    with pytest.raises(KompaktError, match="NaN"):
        compile_ir(model, f"canonicalize,keep-float-weights,{RTN3},lowrank-compensation", [(bad,)])


def test_the_float_weights_must_be_kept_before_quantizing():
    model = linear_model(torch.randn(64, 32))
    with pytest.raises(PipelineError, match="keep-float-weights"):
        compile_ir(model, f"canonicalize,{RTN3},lowrank-compensation")
    with pytest.raises(KompaktError, match="put 'keep-float-weights' before"):
        compile_ir(model, f"canonicalize,{RTN3},keep-float-weights,lowrank-compensation")


@pytest.mark.parametrize(
    ("options", "option"),
    [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"factor_bits": 4}, "factor_bits")],
)
def test_bad_options_name_the_option(options, option):
    with pytest.raises(ValueError, match=option):
        LowrankCompensation(**options)


@pytest.mark.slow
def test_lorc_improves_the_tiny_trained_lm_perplexity():
    from kompakt.eval.perplexity import byte_windows, perplexity
    from kompakt.lowering import capture_module
    from kompakt.models import load_tiny_lm, tiny_lm_texts

    lm = load_tiny_lm()
    heldout, _ = tiny_lm_texts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_module(lm, (byte_windows(heldout, 128, 1),))
    base = "canonicalize,keep-float-weights,quantize-weights{bits=3,group-size=128}"
    scores = {}
    for name, pipeline in (("rtn", base), ("lorc", base + ",lowrank-compensation")):
        compiled = compile_ir(captured, pipeline)
        scores[name] = perplexity(compiled, heldout, seq_len=128, max_windows=4)
    assert scores["lorc"] < scores["rtn"]
