"""outlier-split: LLM.int8()'s outlier channels and SpQR's outlier weights, math and pass."""

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import OTHER_SHAPE, tokens
from onnx import TensorProto, helper, numpy_helper

import kompakt
import kompakt.passes.quantize.outlier_split  # noqa: F401  (registers the pass)
from kompakt import KompaktError
from kompakt.ir.builder import constant
from kompakt.ir.tensors import to_torch
from kompakt.passes.base import CompileContext
from kompakt.passes.cleanup.canonicalize import Canonicalize
from kompakt.passes.quantize.gptq_math import gptq_quantize, hessian_error
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.passes.quantize.layers import weight_sites
from kompakt.passes.quantize.outlier_split import OutlierSplit, _gathers, _replace_matmul
from kompakt.passes.quantize.outlier_split_math import (
    leave_one_out_gains,
    outlier_channels,
    split_rows,
    spqr_quantize,
)
from kompakt.runtime.plan import ExecutionPlan


def linear_model(weights: list[torch.Tensor]) -> ir.Model:
    """x: f32[m, K] -> MatMul(layers.0.fc) -> MatMul(layers.1.fc) ...; module paths in names."""
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        name = f"model.layers.{i}.fc"
        inits.append(numpy_helper.from_array(w.numpy(), f"{name}.weight"))
        nodes.append(
            helper.make_node(
                "MatMul", [prev, f"{name}.weight"], [f"{name}_out"], name=f"/{name}/MatMul"
            )
        )
        prev = f"{name}_out"
    k, n = weights[0].shape[0], weights[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", n])],
        inits,
    )
    from kompakt.lowering import load_onnx

    return load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def planted(tokens_=256, k=64, n=32, loud=(3, 17), seed=0):
    """Inputs with a few loud channels (LLM.int8()'s outlier features) and a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens_, k, generator=g)
    x[:, list(loud)] *= 20
    return x, torch.randn(k, n, generator=g) * 0.05


def compile_(model, options: str, calibration):
    return kompakt.compile(
        model,
        pipeline="canonicalize,outlier-split" + (f"{{{options}}}" if options else ""),
        calibration=calibration,
        backend="reference",
        estimate_latency=False,
        progress=False,
    )


def run_ir(model, x):
    return ExecutionPlan(model).run({"x": x})[0]


# --- LLM.int8() -------------------------------------------------------------------------------


def test_outlier_channels_threshold_and_cap():
    absmax = torch.tensor([1.0, 9.0, 2.0, 7.0, 30.0, 6.0])
    chosen, over = outlier_channels(absmax, 6.0, 0.9)
    assert chosen.tolist() == [1, 3, 4] and over == 0  # 6.0 itself is not above the threshold
    chosen, over = outlier_channels(absmax, 6.0, 0.34)  # cap 2: the loudest two
    assert chosen.tolist() == [1, 4] and over == 1
    assert split_rows(6, chosen).tolist() == [0, 2, 3, 5]
    assert outlier_channels(torch.full((4,), 100.0), 6.0, 0.99)[0].numel() == 3  # never all


def test_split_is_exact_in_float(captured):
    """Both branches in float: Gather + two MatMuls + Add compute exactly x W."""
    model = captured("llama").clone()
    Canonicalize().run(model, CompileContext())
    ids = tokens(OTHER_SHAPE, seed=3)
    before = ExecutionPlan(model).run({"input_ids": ids})[0]
    cache = {}
    for site in weight_sites(model.graph):
        w = to_torch(site.weight.const_value)
        outliers = torch.tensor([0, 5, w.shape[0] - 1])
        regular = split_rows(w.shape[0], outliers)
        rows_o = constant(model.graph, w[outliers].clone(), "o_rows")
        rows_r = constant(model.graph, w[regular].clone(), "r_rows")
        for matmul in list(site.matmuls):
            picked = _gathers(model.graph, matmul, outliers, regular, cache)
            _replace_matmul(model.graph, matmul, picked, rows_o, rows_r)
    assert sum(n.op_type == "Gather" for n in model.graph) > 2
    after = ExecutionPlan(model).run({"input_ids": ids})[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_planted_outlier_channels_go_to_float():
    x, w = planted()
    model = linear_model([w])
    compiled = compile_(model, "", [{"x": x[:128]}, {"x": x[128:]}])
    record = compiled.report().passes[-1].result.records[0]
    assert record["outliers"] == 2 and record["module"] == "model.layers.0.fc"
    # int8 rows + f32 scales + float rows + int64 indices of both Gathers
    assert record["bytes_after"] == 62 * 32 + 32 * 4 + 2 * 32 * 4 + 8 * 64
    gathers = [n for n in compiled.ir.graph if n.op_type == "Gather"]
    indices = sorted(to_torch(g.inputs[1].const_value).tolist() for g in gathers)
    assert [3, 17] in indices and len(indices[0]) + len(indices[1]) == 64
    float_rows = next(v for k, v in compiled.ir.graph.initializers.items() if "outlier_rows" in k)
    torch.testing.assert_close(to_torch(float_rows.const_value), w[[3, 17]])
    dq = next(n for n in compiled.ir.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].dtype == ir.DataType.INT8 and list(dq.inputs[0].shape) == [62, 32]
    assert dq.outputs[0].uses()[0].node.op_type == "MatMul"  # what quantize-activations looks for
    # the loud channels in float remove most of int8's error, which they dominate
    assert record["output_error"] < 0.5 * record["int8_output_error"]
    out = compiled(x)
    assert (out - x @ w).abs().max() < (
        x @ quantize_rtn(w, Grid(8, -1, True)).dequantize() - x @ w
    ).abs().max()


def test_no_outliers_means_plain_int8():
    x, w = planted(loud=())
    compiled = compile_(linear_model([w]), "", [{"x": x}])
    ops = [n.op_type for n in compiled.ir.graph]
    assert ops == ["DequantizeLinear", "MatMul"]
    torch.testing.assert_close(
        compiled(x), x @ quantize_rtn(w, Grid(8, -1, True)).dequantize(), rtol=1e-5, atol=1e-5
    )


# --- SpQR --------------------------------------------------------------------------------------


def layer(k=128, n=48, tokens_=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens_, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    x[:, :4] *= 8
    w = torch.randn(k, n, generator=g) * 0.05
    w[torch.rand(k, n, generator=g) < 0.005] *= 10  # sparse large weights
    return w, x, x.T @ x / tokens_


def test_leave_one_out_finds_the_weight_that_stretches_its_group():
    group = torch.randn(16, 8) * 0.01
    group[5, 2] = 1.0
    gains = leave_one_out_gains(group, torch.ones(16), Grid(3, 16, False))
    assert int(gains[:, 2].argmax()) == 5 and gains[5, 2] > 10 * gains[:, [0, 1, 3]].max()


@pytest.mark.parametrize(("bits", "symmetric"), [(3, False), (4, False), (4, True)])
def test_spqr_beats_gptq_and_keeps_the_budget(bits, symmetric):
    w, _, h = layer()
    grid = Grid(bits, 16, symmetric)
    sq = spqr_quantize(w, h, grid, 0.01, block_size=32)
    assert 0 < sq.index.numel() <= int(0.01 * w.numel())
    none = spqr_quantize(w, h, grid, 0.0, block_size=32)
    gptq, _ = gptq_quantize(w, h, grid, act_order=False)
    error = hessian_error(w, sq.dequantize(), h)
    assert none.index.numel() == 0
    assert error < 0.8 * hessian_error(w, gptq.dequantize(), h)
    assert hessian_error(w, none.dequantize(), h) < hessian_error(
        w, quantize_rtn(w, grid).dequantize(), h
    )
    damped = h + torch.eye(128) * 0.01 * h.diagonal().mean()
    delta = w - sq.dequantize()
    assert sq.loss == pytest.approx(float(((damped @ delta) * delta).sum()), rel=1e-3)


def test_outliers_are_left_out_of_the_group_statistics():
    w = torch.randn(32, 8) * 0.01
    w[3, 1] = 2.0  # alone, it would set group 0 / column 1's range
    sq = spqr_quantize(w, torch.eye(32), Grid(4, 16, False), 1 / 256)
    assert sq.index.tolist() == [3 * 8 + 1]
    rtn_scale = float(quantize_rtn(w, Grid(4, 16, False)).scale[0, 1])
    assert float(sq.base.scale[0, 1]) < 0.05 * rtn_scale  # the group fits the small weights
    assert float(sq.dequantize()[3, 1]) == pytest.approx(2.0, rel=1e-3)


def test_weight_kind_ir_and_values():
    w, x, _ = layer(k=64, n=32)
    compiled = compile_(linear_model([w]), "kind=weight,bits=3", [{"x": x}])
    ops = [n.op_type for n in compiled.ir.graph]
    assert ops == ["DequantizeLinear", "Reshape", "ScatterND", "Reshape", "Cast", "MatMul"]
    dq = compiled.ir.graph.node(0)
    assert dq.inputs[0].dtype == ir.DataType.UINT4 and dq.inputs[1].dtype == ir.DataType.FLOAT16
    assert dq.attributes["block_size"].value == 16
    record = compiled.report().passes[-1].result.records[0]
    nnz = record["outliers"]
    assert 0 < nnz <= int(0.01 * 64 * 32)
    # 4-bit codes + f16 scales + 4-bit zero points per group of 16, 10 bytes per outlier
    assert record["bytes_after"] == 64 * 32 // 2 + 4 * 32 * 2 + 4 * 32 // 2 + 10 * nnz + 24
    assert record["output_error"] < record["rtn_output_error"]
    rtn = x @ quantize_rtn(w, Grid(3, 16, False)).dequantize()
    assert (compiled(x) - x @ w).pow(2).mean() < (rtn - x @ w).pow(2).mean()


# --- the pass on real graphs, and ONNX Runtime ---------------------------------------------------


@pytest.mark.parametrize("options", ["kind=weight", "threshold=1.0"])
def test_tiny_llama_close_to_float(captured, tiny, options):
    calibration = [(tokens((4, 16), seed=s),) for s in range(3)]
    compiled = compile_(captured("llama"), options, calibration)
    result = compiled.report().passes[-1].result
    assert result.stats["quantized"] == 14 and result.stats["outliers"] > 0
    ids = tokens(OTHER_SHAPE, seed=9)
    with torch.no_grad():
        reference = tiny("llama")(ids).logits
    out = compiled(ids)
    error = float((out - reference).pow(2).mean() / reference.pow(2).mean())
    assert torch.isfinite(out).all() and error < (0.02 if "weight" in options else 1e-3)
    worse = "rtn_output_error" if "weight" in options else "int8_output_error"
    assert all(r["output_error"] <= r[worse] for r in result.records)


@pytest.mark.parametrize("options", ["kind=weight", "kind=weight,symmetric=true", ""])
def test_export_runs_in_onnxruntime_like_the_reference(tmp_path, options):
    x, w = planted(k=64, n=48)
    w2 = torch.randn(48, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    compiled = compile_(linear_model([w, w2]), options, [{"x": x}])
    path = compiled.export_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = x[:7]
    (out,) = session.run(None, {"x": probe.numpy()})
    ref = compiled(probe)
    # ORT may run the int8 MatMul as MatMulNBits with int8 activations; SpQR's path is float
    tolerance = 1e-4 if "weight" in options else 0.02
    torch.testing.assert_close(
        torch.from_numpy(out), ref, rtol=tolerance, atol=tolerance * ref.abs().max().item()
    )


def test_float16_weights_need_no_cast_and_only_limits_the_layers():
    x, w = planted(k=64, n=32)
    model = linear_model([w.half(), torch.eye(32).half()])
    model.graph.inputs[0].dtype = model.graph.outputs[0].dtype = ir.DataType.FLOAT16
    compiled = compile_(model, "kind=weight,only=[model.layers.0.*]", [{"x": x.half()}])
    ops = [n.op_type for n in compiled.ir.graph]
    assert ops == ["DequantizeLinear", "Reshape", "ScatterND", "Reshape", "MatMul", "MatMul"]
    assert compiled.report().passes[-1].result.stats["quantized"] == 1
    out = compiled(x.half())
    assert out.dtype == torch.float16
    rtn = x @ quantize_rtn(w, Grid(4, 16, False)).dequantize()
    assert (out.float() - x @ w).pow(2).mean() < (rtn - x @ w).pow(2).mean()


# --- degenerate inputs and errors --------------------------------------------------------------


@pytest.mark.parametrize("options", ["kind=weight", "threshold=1.0"])
def test_zero_weights_constant_activations_single_sample_stay_finite(options):
    x, w = planted(k=64, n=32)
    w[:, 4] = 0.0  # an all-zero output column
    w[9] = 0.0  # an all-zero input row
    zeros = torch.zeros(32, 16)
    for calibration in ([{"x": x[:1]}], [{"x": torch.full((8, 64), 7.0)}]):
        model = linear_model([w, zeros])
        compiled = compile_(model, options, calibration)
        for record in compiled.report().passes[-1].result.records:
            assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN
        out = compiled(x)
        assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))
        first = linear_model([w])
        one = compile_(first, options, calibration)(x)
        assert torch.isfinite(one).all() and torch.equal(one[:, 4], torch.zeros(256))


def test_nan_calibration_raises():
    x, w = planted()
    x[3, 3] = float("nan")
    with pytest.raises(KompaktError, match="input .x. contains NaN"):
        compile_(linear_model([w]), "kind=weight", [{"x": x}])


def test_nan_weight_names_the_layer():
    x, w = planted()
    w[2, 2] = float("nan")
    for options in ("kind=weight", ""):
        with pytest.raises(KompaktError, match=r"model\.layers\.0\.fc"):
            compile_(linear_model([w]), options, [{"x": x}])


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"kind": "both"}, "kind"),
        ({"threshold": 0.0}, "threshold"),
        ({"max_outlier_fraction": 1.0}, "max_outlier_fraction"),
        ({"kind": "weight", "outlier_fraction": -0.1}, "outlier_fraction"),
        ({"kind": "weight", "bits": 5}, "bits"),
        ({"kind": "weight", "group_size": -1}, "group_size"),
        ({"kind": "weight", "group_size": 24}, "group_size"),
        ({"kind": "weight", "damp": 0.0}, "damp"),
        ({"kind": "weight", "block_size": 0}, "block_size"),
        ({"kind": "activation", "bits": 3}, "bits"),
        ({"kind": "weight", "threshold": 3.0}, "threshold"),
    ],
)
def test_bad_options_name_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        OutlierSplit(**options)


def test_quantize_activations_then_takes_the_int8_part_only():
    """LLM.int8() in full: int8 activations (per token) on the int8 rows, float on the rest."""
    pytest.importorskip("kompakt.passes.quantize.quantize_activations")
    x, w = planted()
    compiled = compile_(linear_model([w]), "", [{"x": x}])
    both = kompakt.compile(
        linear_model([w]),
        pipeline="canonicalize,outlier-split,quantize-activations{dynamic=true}",
        calibration=[{"x": x}],
        backend="reference",
        estimate_latency=False,
        progress=False,
    )
    quantized = [n for n in both.ir.graph if n.op_type == "QuantizeLinear"]
    assert len(quantized) == 1
    gather = quantized[0].inputs[0].producer()
    assert gather.op_type == "Gather" and to_torch(gather.inputs[1].const_value).numel() == 62
    weight_only = compiled(x)
    error = (both(x) - weight_only).abs().max()
    assert 0 < error < 0.05 * weight_only.abs().max()
