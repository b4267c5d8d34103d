"""fp8: E4M3 rounding, the IR it writes, numerics vs float, export and ONNX Runtime."""

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import OTHER_SHAPE, tokens
from tiny_models import linear_model

import kompakt
import kompakt.passes.quantize.fp8  # noqa: F401  (registers the pass)
from kompakt import KompaktError
from kompakt.ir.tensors import to_torch
from kompakt.passes.quantize.fp8 import Fp8
from kompakt.passes.quantize.fp8_math import fake_quantize, to_e4m3, weight_scale


def compile_ir(model, pipeline: str, calibration=None):
    return kompakt.compile(
        model,
        pipeline=pipeline,
        calibration=calibration,
        backend="reference",
        progress=False,
        estimate_latency=False,
    )


def ort_session(path) -> ort.InferenceSession:
    """ORT 1.31's QDQ fusion would turn float8 Q/DQ + MatMul into MatMulIntegerToFloat, which
    rejects float8 (INVALID_GRAPH); without that fusion its float8 kernels run the model."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_e4m3_maps_the_max_to_448_within_its_precision():
    torch.manual_seed(0)
    w = torch.randn(64, 16)
    w[:, 3] = 0  # an all-zero column gets scale 1 and stays exactly 0
    scale = weight_scale(w, per_channel=True)
    codes = to_e4m3(w, scale)
    assert codes.dtype == torch.float8_e4m3fn and scale[3] == 1
    assert torch.allclose(codes.float().abs().amax(0)[[0, 1, 2, 4]], torch.tensor(448.0))
    back = codes.float() * scale
    normal = (w / scale).abs() >= 2**-6  # E4M3's normal range: relative error <= 2^-4
    assert ((back - w).abs() <= w.abs() * 2**-4 + 1e-12)[normal].all()
    assert bool((back[:, 3] == 0).all())
    assert weight_scale(w, per_channel=False).dim() == 0


def test_static_fp8_ir_numerics_and_onnxruntime(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(96, 32) * 0.05
    calibration = [(torch.randn(4, 96),) for _ in range(3)]
    compiled = compile_ir(linear_model(w), "canonicalize,fp8", calibration)
    graph = compiled.ir.graph
    assert sorted(n.op_type for n in graph) == [
        "DequantizeLinear",
        "DequantizeLinear",
        "MatMul",
        "QuantizeLinear",
    ]
    matmul = next(n for n in graph if n.op_type == "MatMul")
    act_dq, weight_dq = (v.producer() for v in matmul.inputs)
    quantize = act_dq.inputs[0].producer()
    assert quantize.inputs[2].dtype == ir.DataType.FLOAT8E4M3FN
    assert quantize.outputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    assert weight_dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    assert list(weight_dq.inputs[0].shape) == [96, 32] and list(weight_dq.inputs[1].shape) == [32]
    # the static input scale maps the calibration max to 448
    amax = max(float(b[0].abs().max()) for b in calibration)
    s_x = float(to_torch(quantize.inputs[1].const_value))
    assert s_x == pytest.approx(amax / 448)
    x = torch.randn(5, 96)
    w_hat = weight_scale(w, True) * to_e4m3(w, weight_scale(w, True)).float()
    expected = fake_quantize(x, torch.tensor(s_x)) @ w_hat
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert relative(compiled(x), x @ w) < 0.08
    (record,) = compiled.report().passes[-1].result.records
    assert record["bytes_after"] == 96 * 32 + 32 * 4 and 0 < record["output_error"] < 0.08
    path = compiled.export_onnx(tmp_path / "fp8.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    (out,) = ort_session(path).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), compiled(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", ["", "{weight-scale=tensor}", "{dynamic=true}"])
def test_tiny_llama_close_to_float_and_the_same_in_onnxruntime(captured, tiny, tmp_path, options):
    ids = tokens(OTHER_SHAPE, seed=5)
    with torch.no_grad():
        reference = tiny("llama")(ids).logits
    calibration = None if "dynamic" in options else [(tokens((4, 16), seed=s),) for s in range(2)]
    compiled = compile_ir(captured("llama"), f"canonicalize,fp8{options}", calibration)
    out = compiled(ids)
    assert relative(out, reference) < 0.1
    result = compiled.report().passes[-1].result
    assert result.stats["quantized"] == 14
    assert sum(n.op_type == "QuantizeLinear" for n in compiled.ir.graph) == 8  # inputs, shared
    path = compiled.export_onnx(tmp_path / "llama_fp8.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    (ort_out,) = ort_session(path).run(None, {"input_ids": ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(ort_out), out, rtol=1e-4, atol=1e-4)


def test_weight_only_fp8_runs_in_the_onnxruntime_backend(captured):
    compiled = kompakt.compile(
        captured("llama"),
        pipeline="canonicalize,fp8{activations=false}",
        progress=False,
        estimate_latency=False,
    )
    assert compiled.backend == "onnxruntime"
    reference = compile_ir(captured("llama"), "canonicalize,fp8{activations=false}")
    ids = tokens(OTHER_SHAPE, seed=2)
    torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_degenerate_weights_and_activations_stay_finite():
    w = torch.randn(64, 32) * 0.05
    w[:8] = 0  # all-zero input rows
    w[:, :4] = 0  # all-zero output columns
    x = torch.randn(3, 64)
    for options, calibration in (
        ("", [(torch.zeros(1, 64),)]),  # one all-zero sample: scale 1, no 0 / 0
        ("", [(torch.full((1, 64), 0.5),)]),  # one constant sample
        ("{dynamic=true}", None),
    ):
        compiled = compile_ir(linear_model(w), f"canonicalize,fp8{options}", calibration)
        for inputs in (x, torch.zeros(2, 64)):
            out = compiled(inputs)
            assert torch.isfinite(out).all() and bool((out[:, :4] == 0).all())
        record = compiled.report().passes[-1].result.records[0]
        assert all(v == v for v in record.values() if isinstance(v, float))


def test_nan_calibration_and_nan_weights_are_refused_clearly():
    bad = torch.randn(2, 64)
    bad[1, 5] = float("nan")
    with pytest.raises(KompaktError, match="NaN"):
        compile_ir(linear_model(torch.randn(64, 8)), "canonicalize,fp8", [(bad,)])
    w = torch.randn(64, 8)
    w[0, 0] = float("inf")
    with pytest.raises(KompaktError, match="fc.*NaN or Inf"):
        compile_ir(linear_model(w), "canonicalize,fp8{dynamic=true}")


def test_static_scales_need_calibration_and_bad_options_name_the_option():
    with pytest.raises(KompaktError, match="calibration"):
        compile_ir(linear_model(torch.randn(64, 8)), "canonicalize,fp8")
    assert not Fp8(dynamic=True).uses_calibration and Fp8().uses_calibration
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8(weight_scale="row")
    with pytest.raises(ValueError, match="dynamic"):
        Fp8(dynamic="yes")


def test_fp8_with_activations_runs_in_the_onnxruntime_backend(captured):
    """ORT fuses Q/DQ MatMuls into MatMulIntegerToFloat, which rejects float8: the backend turns
    that fusion off for float8 models instead of failing to load them."""
    pipeline = "canonicalize,fp8{dynamic=true}"
    compiled = kompakt.compile(
        captured("llama"), pipeline=pipeline, progress=False, estimate_latency=False
    )
    assert compiled.backend == "onnxruntime"
    reference = compile_ir(captured("llama"), pipeline)
    ids = tokens(OTHER_SHAPE, seed=2)
    torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-3, atol=1e-3)
