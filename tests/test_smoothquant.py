"""SmoothQuant and int8 activation quantization (W8A8 as QDQ): the scale math, exactness of the
smoothing in float, the QDQ IR against float and ONNX Runtime, dynamic shapes, degenerate data."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import OTHER_SHAPE, tokens
from onnx import TensorProto, helper, numpy_helper

import kompakt
import kompakt.passes.quantize.quantize_activations  # noqa: F401  (registers the pass)
import kompakt.passes.quantize.smoothquant  # noqa: F401
from kompakt import KompaktError, Pipeline
from kompakt.errors import CalibrationError, PipelineError
from kompakt.passes.base import CompileContext
from kompakt.passes.manager import PassManager
from kompakt.passes.quantize.quantize_activations import QuantizeActivations
from kompakt.passes.quantize.smoothquant import SmoothQuant
from kompakt.passes.quantize.smoothquant_math import channel_spread, smoothing_scales
from kompakt.runtime.plan import ExecutionPlan

W8 = "quantize-weights{bits=8,group-size=-1,symmetric=true}"
K, N = 64, 48


def block_model(gamma: torch.Tensor, w_q, w_k, w_out, nan_first=False):
    """x -> Mul(gamma) -> {MatMul(w_q), MatMul(w_k)} -> Add -> MatMul(w_out), named like the
    legacy exporter so nodes get module paths in block model.layers.0."""
    from kompakt.lowering import load_onnx

    inits = [
        numpy_helper.from_array(gamma.numpy(), "norm.weight"),
        numpy_helper.from_array(w_q.numpy(), "q.weight"),
        numpy_helper.from_array(w_k.numpy(), "k.weight"),
        numpy_helper.from_array(w_out.numpy(), "out.weight"),
    ]
    p = "/model/layers.0"
    nodes = [
        helper.make_node("Mul", ["x", "norm.weight"], ["h"], name=f"{p}/norm/Mul"),
        helper.make_node("MatMul", ["h", "q.weight"], ["q"], name=f"{p}/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "k.weight"], ["k"], name=f"{p}/attn/k_proj/MatMul"),
        helper.make_node("Add", ["q", "k"], ["s"], name=f"{p}/attn/Add"),
        helper.make_node("MatMul", ["s", "out.weight"], ["y"], name=f"{p}/mlp/out_proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", w_out.shape[1]])],
        inits,
    )
    return load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def outlier_model(seed=0):
    """Channels 0-3 of x carry activations ~50x the rest, as in LLM activations (paper fig. 4)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.ones(K)
    gamma[:4] = 50.0
    weights = [torch.randn(K, N, generator=g) * 0.05 for _ in range(2)]
    return block_model(gamma, *weights, torch.randn(N, 32, generator=g) * 0.05)


@pytest.fixture(scope="module")
def float_llama(captured):
    return kompakt.compile(captured("llama"), pipeline="canonicalize", backend="reference")


def batches(count=4, shape=(2, 16, K), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale,) for _ in range(count)]


def run_pipeline(model, text, calibration=None):
    ctx = CompileContext(calibration=calibration, progress=False)
    return PassManager(Pipeline.parse(text)).run(model, ctx)


def output(model, x):
    (y,) = ExecutionPlan(model).run({"x": x})[:1]
    return y


def relative_mse(reference, approx):
    return float((approx - reference).pow(2).mean() / reference.pow(2).mean())


# --- the math -------------------------------------------------------------------------------


def test_scales_follow_the_paper_formula_and_tame_degenerate_channels():
    act = torch.tensor([100.0, 1.0, 0.0, 4.0, 2.0])
    w = torch.tensor([[0.5, -0.1], [1.0, 0.2], [0.3, 0.3], [0.0, 0.0], [0.25, 0.5]])
    s = smoothing_scales(act, [w, w * 0.5], alpha=0.5)
    expected = act.sqrt() / w.abs().amax(1).sqrt()
    torch.testing.assert_close(s[[0, 1, 4]], expected[[0, 1, 4]])
    assert s[2] == 1 and s[3] == 1  # all-zero activation channel; all-zero weight row
    # α = 1 moves the whole activation range into the weights: x / s is flat (max |x| = max |w|)
    flat = act / smoothing_scales(act, [w], alpha=1.0)
    assert channel_spread(flat[[0, 1, 4]]) < channel_spread(act[[0, 1, 4]]) / 10
    assert torch.isfinite(smoothing_scales(torch.zeros(5), [torch.zeros(5, 2)], 0.5)).all()


# --- smoothquant ----------------------------------------------------------------------------


def test_smoothing_is_exact_in_float_and_shrinks_the_outliers():
    model = outlier_model()
    x = batches(1, (3, 7, K), seed=9)[0][0]
    before = output(model, x)
    records = run_pipeline(model, "canonicalize,smoothquant", batches())
    result = records[-1].result
    torch.testing.assert_close(output(model, x), before, rtol=1e-4, atol=1e-5)
    assert result.stats["smoothed"] == 3
    assert result.stats["input_scales folded into Mul"] == 1  # into the norm's gamma
    assert result.stats["input_scales explicit Mul"] == 1  # Add feeds out_proj: a Mul goes in
    q = next(r for r in result.records if r["module"].endswith("q_proj"))
    assert q["act_spread_before"] > 40 and q["act_spread_after"] < q["act_spread_before"] / 5
    assert q["w8a8_error_after"] < q["w8a8_error_before"] / 3


def test_smoothquant_is_exact_on_a_tiny_llama(captured, float_llama):
    ids = tokens(OTHER_SHAPE, seed=3)
    smooth = kompakt.compile(
        captured("llama"),
        pipeline="canonicalize,smoothquant",
        calibration=[(tokens((2, 16), seed=1),)],
        backend="reference",
        progress=False,
    )
    before, after = float_llama(ids), smooth(ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    stats = smooth.report().passes[-1].result.stats
    assert stats["input_scales folded into Mul"] == 4  # q/k/v and gate/up: into the RMSNorms
    assert stats["input_scales folded into MatMul (through Mul)"] == 2  # down_proj: up_proj
    assert stats["input_scales explicit Mul"] == 2  # o_proj reads attention's output


def test_later_layers_are_calibrated_on_what_the_smoothed_layers_compute(captured):
    """Smoothing leaves the float model unchanged, so what a later layer's input looks like
    (its simulated W8A8 error before smoothing) cannot depend on alpha. It did while the
    calibration runner kept the pre-smoothing weights cached through the stage's forward run."""
    calibration = [(tokens((2, 16), seed=1),)]
    errors = {}
    for alpha in (0.5, 1.0):
        cm = kompakt.compile(
            captured("llama"),
            pipeline=f"canonicalize,smoothquant{{alpha={alpha}}}",
            calibration=calibration,
            backend="reference",
            progress=False,
            estimate_latency=False,
        )
        records = cm.report().passes[-1].result.records
        errors[alpha] = {r["module"]: r["w8a8_error_before"] for r in records}
    later = [m for m in errors[0.5] if ".layers.1." in m]
    assert later
    for module in later:
        # records round to 6 decimals; the stale cache moved these by 2-5x
        assert errors[1.0][module] == pytest.approx(errors[0.5][module], rel=0.03, abs=2e-6), module


def test_alpha_search_never_raises_the_simulated_w8a8_error():
    model = outlier_model(1)
    (_, record) = run_pipeline(model, "canonicalize,smoothquant{search=true}", batches())
    rows = record.result.records
    assert all(r["w8a8_error_after"] <= r["w8a8_error_before"] for r in rows)
    q = next(r for r in rows if r["module"].endswith("q_proj"))
    assert q["alpha"] is not None and q["w8a8_error_after"] < q["w8a8_error_before"] / 3


def test_smoothquant_validates_alpha_and_names_a_nan_weight():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(PipelineError):
        Pipeline.parse("smoothquant{alpha=-0.1}")
    g = torch.ones(K)
    w = torch.randn(K, N)
    w[5, 5] = float("nan")
    model = block_model(g, w, torch.randn(K, N), torch.randn(N, 8))
    with pytest.raises(KompaktError, match="q_proj.*NaN"):
        run_pipeline(model, "canonicalize,smoothquant", batches(1))


def test_nan_in_calibration_is_refused_clearly():
    model = outlier_model()
    bad = batches(2)
    bad[1][0][0, 3, 7] = float("nan")
    with pytest.raises(KompaktError, match="batch 1.*NaN"):
        run_pipeline(model, "canonicalize,smoothquant", bad)
    # NaN that appears inside the network (an inf weight, excluded from smoothing) is named too
    w = torch.randn(K, N)
    w[0, 0] = float("inf")
    model = block_model(torch.ones(K), w, torch.randn(K, N), torch.randn(N, 8))
    with pytest.raises(KompaktError, match="out_proj.*NaN or Inf"):
        run_pipeline(model, "canonicalize,smoothquant{exclude=[*q_proj]}", batches(1))


def test_constant_activations_and_zero_weights_stay_finite_with_one_sample():
    """A constant input, a dead (all-zero) input channel, all-zero weight rows and columns, and a
    single calibration row: no NaN anywhere, in either mode."""
    gamma = torch.ones(K)
    gamma[10:20] = 0.0  # dead activation channels
    w_q = torch.randn(K, N) * 0.1
    w_q[:8] = 0.0  # all-zero weight rows
    w_q[:, :4] = 0.0  # all-zero output columns
    w_k = torch.zeros(K, N)  # an all-zero weight
    model = block_model(gamma, w_q, w_k, torch.randn(N, 8) * 0.1)
    one = [(torch.full((1, 1, K), 0.5),)]  # one token, constant across channels
    static = model.clone()
    records = run_pipeline(static, f"canonicalize,smoothquant,{W8},quantize-activations", one)
    for record in records:
        for row in record.result.records:
            assert not any(np.isnan(v) for v in row.values() if isinstance(v, float)), row
    dynamic = model.clone()
    run_pipeline(dynamic, f"canonicalize,{W8},quantize-activations{{dynamic=true}}")
    x = torch.randn(2, 5, K)
    x[0, 2] = 0.0  # an all-zero token: its dynamic scale must not be 0
    for m in (static, dynamic):
        y = output(m, x)
        assert torch.isfinite(y).all()
    assert torch.isfinite(output(static, torch.zeros(1, 3, K))).all()


# --- quantize-activations -------------------------------------------------------------------


def test_options_are_validated_and_weights_must_be_quantized_first():
    with pytest.raises(ValueError, match="bits must be 8"):
        QuantizeActivations(bits=4)
    with pytest.raises(PipelineError, match="bits"):
        Pipeline.parse("quantize-activations{bits=4}")
    with pytest.raises(PipelineError, match="weights-quantized"):
        PassManager(Pipeline.parse("canonicalize,quantize-activations"))
    assert QuantizeActivations().uses_calibration
    assert not QuantizeActivations(dynamic=True).uses_calibration


def test_static_mode_without_calibration_is_refused_before_compiling(captured):
    with pytest.raises(CalibrationError, match="quantize-activations.*calibration"):
        kompakt.compile(
            captured("llama"),
            pipeline=f"canonicalize,{W8},quantize-activations",
            backend="reference",
        )


def test_static_w8a8_on_a_tiny_llama_is_close_to_float_and_runs_in_onnxruntime(
    captured, float_llama, tmp_path
):
    # short and long sequences in calibration: a static scale only covers what it has seen
    calibration = [(tokens(shape, seed=s),) for s, shape in enumerate([(4, 16), (4, 16), (3, 5)])]
    float_model = float_llama
    compiled = kompakt.compile(
        captured("llama"),
        pipeline=f"canonicalize,smoothquant,{W8},quantize-activations",
        calibration=calibration,
        backend="reference",
        progress=False,
    )
    result = compiled.report().passes[-1].result
    assert result.stats["matmuls"] == 14 and result.stats["kept_float"] == 1  # lm_head
    assert any("lm_head: input kept in float" in n for n in result.notes)
    assert all(r["input_sqnr_db"] > 25 for r in result.records)
    ids = [tokens((4, 16), seed=20), tokens(OTHER_SHAPE, seed=21)]
    for x in ids:
        reference, quantized = float_model(x), compiled(x)
        assert relative_mse(reference, quantized) < 2e-3
        assert relative_mse(reference, quantized) > 1e-7  # activations really were rounded

    ops = Counter(n.op_type for n in compiled._model.graph)
    assert ops["QuantizeLinear"] == 14  # one pair per MatMul (see insert_static_qdq)
    path = compiled.export_onnx(tmp_path / "w8a8.onnx")
    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert fused["MatMulIntegerToFloat"] == 14  # every quantized MatMul runs int8 x int8
    for x in ids:
        (out,) = session.run(None, {"input_ids": x.numpy()})
        expected = compiled(x)
        # ORT accumulates in int32, the reference in float32: a value at a rounding boundary of
        # the next layer's QuantizeLinear can land one int8 step apart, hence no 1e-6 agreement
        out = torch.from_numpy(out)
        assert relative_mse(expected, out) < 1e-6
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


def test_static_w8a8_in_the_onnxruntime_backend_keeps_the_integer_gemm(captured):
    """lower-to-matmulnbits leaves statically quantized activations' MatMuls to ORT's int8 GEMM."""
    calibration = [(tokens((4, 16), seed=s),) for s in range(2)]
    pipeline = f"canonicalize,{W8},quantize-activations"
    via_ort = kompakt.compile(
        captured("llama"), pipeline=pipeline, calibration=calibration, progress=False
    )
    assert via_ort.backend == "onnxruntime"
    ops = via_ort._backend.op_counts
    assert ops["QuantizeLinear"] == 14 and ops["com.microsoft::MatMulNBits"] == 0
    reference = kompakt.compile(
        captured("llama"),
        pipeline=pipeline,
        calibration=calibration,
        backend="reference",
        progress=False,
    )
    x = tokens(OTHER_SHAPE, seed=5)
    assert relative_mse(reference(x), via_ort(x)) < 1e-5


def test_dynamic_w8a8_works_at_any_shape_and_matches_onnxruntime(captured, float_llama, tmp_path):
    float_model = float_llama
    compiled = kompakt.compile(
        captured("llama"),
        pipeline=f"canonicalize,{W8},quantize-activations{{dynamic=true}}",
        backend="reference",
        progress=False,
    )
    assert compiled.report().passes[-1].result.stats["matmuls"] == 14  # lm_head's weight is float
    path = compiled.export_onnx(tmp_path / "dynamic.onnx")
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [OTHER_SHAPE, (1, 11), (2, 8)]:
        x = tokens(shape, seed=sum(shape))
        reference, quantized = float_model(x), compiled(x)
        assert 1e-8 < relative_mse(reference, quantized) < 2e-3
        (out,) = session.run(None, {"input_ids": x.numpy()})
        torch.testing.assert_close(
            torch.from_numpy(out), quantized, rtol=1e-4, atol=1e-4 * quantized.abs().max().item()
        )


def test_static_scale_is_per_tensor_absmax_and_idempotent():
    model = outlier_model()
    calibration = batches(3, scale=2.0)
    run_pipeline(model, f"canonicalize,{W8},quantize-activations", calibration)
    first = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(first) == 3
    q = next(n for n in first if "q_proj" in n.name)
    top = max(float((x * 1).abs()[..., 4:].max().clamp(min=0)) for (x,) in calibration)
    top = max(top, max(float(x[..., :4].abs().max()) * 50 for (x,) in calibration))
    assert float(q.inputs[1].const_value.numpy()) == pytest.approx(top / 127, rel=1e-5)
    assert q.inputs[2].dtype == onnx.TensorProto.INT8 or q.inputs[2].dtype.name == "INT8"
    again = QuantizeActivations().run(
        model, CompileContext(calibration=calibration, progress=False)
    )
    assert again.stats["matmuls"] == 0  # inputs already quantized are left as they are
