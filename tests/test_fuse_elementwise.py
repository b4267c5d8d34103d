"""fuse-elementwise and the pointwise binder: what is grouped, what is refused, and that nothing
changes (reference runtime exactly, ONNX Runtime after export, Triton kernels in the interpreter)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import first_output

import kompakt
import kompakt.passes.fuse.fuse_elementwise  # noqa: F401  (registers the pass)
from kompakt.codegen.registry import binder_for
from kompakt.ir.builder import make_model
from kompakt.ir.fused import body_of, fuse_nodes, is_fused, pattern_of
from kompakt.ir.verify import verify
from kompakt.passes.base import CompileContext
from kompakt.passes.fuse.fuse_elementwise import FuseElementwise
from kompakt.runtime.plan import ExecutionPlan

F32, F16, BOOL = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BOOL
BASE = "canonicalize,infer-shapes"
QUANT = BASE + ",quantize-weights{bits=4,group-size=16},fuse-dequant-matmul"
# Triton kernels run on the GPU when there is one, else in the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE_DIR", str(tmp_path / "kernels"))


def _compile(captured, name, pipeline, backend="reference", device="cpu"):
    return kompakt.compile(
        captured(name),
        target="a100",
        pipeline=pipeline,
        backend=backend,
        progress=False,
        device=device,
    )


def _groups(model) -> collections.Counter:
    return collections.Counter(
        tuple(n.op_type for n in body_of(node))
        for node in model.graph
        if is_fused(node) and pattern_of(node) == "pointwise"
    )


def _record(cm):
    return next(r for r in cm.report().passes if r.name.startswith("fuse-elementwise")).result


# --- captured tiny models ---------------------------------------------------------------------


def test_llama_quantized_groups_and_why_the_rest_stays(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-elementwise")
    # Per layer: the RMSNorm tails' Add(eps)/Sqrt/Reciprocal (2 + the final norm) and rotary's
    # q Add(q*cos, rotate(q)*sin) with the attention scale. SiLU is in gate_proj's kernel already.
    assert _groups(cm.ir) == {("Add", "Sqrt", "Reciprocal"): 5, ("Add", "Mul"): 2}
    result = _record(cm)
    assert result.stats["groups"] == 7 and result.stats["nodes"] == 19
    # cos/sin broadcast over batch and heads ([1,1,s,16]), x*rsqrt over the hidden dim
    notes = "\n".join(result.notes)
    assert "'unsqueeze_14' [1,1,sequence,16]" in notes and "cannot index" in notes
    assert "'rsqrt' [batch,sequence,1]" in notes


def test_llama_float_groups_silu_times_up_and_the_residual_stream(captured):
    cm = _compile(captured, "llama", BASE + ",fuse-elementwise")
    groups = _groups(cm.ir)
    assert groups[("Sigmoid", "Mul", "Mul")] == 2  # SiLU(gate) * up
    assert groups[("Add", "Pow")] == 4  # residual add, and its square for the next RMSNorm
    residual = [n for n in cm.ir.graph if is_fused(n) and len(n.outputs) == 2]
    assert len(residual) == 4  # both the sum and its square leave the kernel


@pytest.mark.parametrize(
    "name, pipeline",
    [("llama", QUANT), ("llama", BASE), ("gpt2", BASE)],
    ids=["llama-w4", "llama", "gpt2"],
)
def test_fused_model_computes_exactly_what_the_unfused_one_does(captured, name, pipeline):
    plain = _compile(captured, name, pipeline)
    fused = _compile(captured, name, pipeline + ",fuse-elementwise")
    assert _groups(fused.ir)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        assert torch.equal(first_output(fused(ids)), first_output(plain(ids)))


def test_gpt2_refuses_the_residual_adds_that_would_close_a_cycle(captured):
    cm = _compile(captured, "gpt2", BASE + ",fuse-elementwise")
    # tanh-GELU written out: x*0.5*(1+tanh(0.79788*(x+0.044715*x**3))), one kernel per layer
    assert _groups(cm.ir) == {("Mul", "Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul"): 2}
    cycles = [n for n in _record(cm).notes if "cycle" in n]
    assert cycles and all("LayerNormalization" in n for n in cycles)


def test_export_inlines_the_groups_back_to_standard_onnx(captured, tmp_path):
    cm = _compile(captured, "llama", QUANT + ",fuse-elementwise")
    proto = onnx.load(cm.export_onnx(tmp_path / "m.onnx"))
    assert not any(n.domain == "kompakt" for n in proto.graph.node)
    assert sum(n.op_type == "Reciprocal" for n in proto.graph.node) == 5
    ids = tokens(EXAMPLE_SHAPE)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), first_output(cm(ids)), rtol=1e-3, atol=2e-2)


@pytest.mark.parametrize(
    "name, pipeline, kernels",
    [("llama", QUANT, "pointwise x7"), ("llama", BASE, "pointwise x13"), ("gpt2", BASE, "x2")],
    ids=["llama-w4", "llama", "gpt2"],
)
def test_triton_backend_runs_each_group_as_one_kernel(captured, name, pipeline, kernels):
    pytest.importorskip("triton")
    pipeline += ",fuse-elementwise"
    triton = _compile(captured, name, pipeline, backend="triton", device=DEVICE)
    reference = _compile(captured, name, pipeline, device=DEVICE)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        got, want = first_output(triton(ids)), first_output(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    summary = triton._backend.summary()
    assert kernels in summary and "pointwise" in summary
    assert "fell back" not in summary


def test_min_nodes_option(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-elementwise{min-nodes=3}")
    assert _groups(cm.ir) == {("Add", "Sqrt", "Reciprocal"): 5}
    assert any("below min-nodes=3" in n for n in _record(cm).notes)
    assert "fuse-elementwise{min-nodes=3}" in cm.pipeline


# --- hand-built graphs ------------------------------------------------------------------------


class _Graph:
    """A few lines per test graph: inputs, initializers and single-output nodes."""

    def __init__(self) -> None:
        self.inputs, self.inits, self.nodes = [], [], []

    def input(self, name, shape, dtype=F32) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        self.inputs.append(value)
        return value

    def const(self, name, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.inits.append(value)
        return value

    def op(self, op_type, *inputs, shape, dtype=F32, attrs=()) -> ir.Value:
        node = ir.Node("", op_type, inputs, list(attrs), name=f"n{len(self.nodes)}_{op_type}")
        out = node.outputs[0]
        out.name, out.shape, out.type = node.name, ir.Shape(shape), ir.TensorType(dtype)
        self.nodes.append(node)
        return out

    def model(self, *outputs) -> ir.Model:
        return make_model(self.inputs, list(outputs), self.nodes, self.inits)


def _fuse(model, **options):
    result = FuseElementwise(**options).run(model, CompileContext(progress=False))
    verify(model)
    return result


def _run(model, feeds, backend="reference"):
    if backend == "reference":
        return ExecutionPlan(model).run(feeds)
    from kompakt.runtime.triton_backend import TritonBackend

    runner = TritonBackend(model, device=DEVICE)
    return [t.cpu() for t in runner.run(feeds)], runner.summary()


def test_a_group_that_would_contain_a_cycle_is_left_alone():
    g = _Graph()
    x = g.input("x", [2, 5])
    a = g.op("Relu", x, shape=[2, 5])
    s = g.op("Softmax", a, shape=[2, 5])  # a -> Softmax -> Add: {Relu, Add} would wrap it
    y = g.op("Add", a, s, shape=[2, 5])
    model = g.model(y)
    result = _fuse(model)
    assert not result.changed and not _groups(model)
    assert any("cycle through 'n1_Softmax' (Softmax)" in n for n in result.notes)


def test_a_diamond_of_elementwise_ops_is_one_group_with_an_escaping_value():
    g = _Graph()
    x = g.input("x", [3, 7])
    a = g.op("Relu", x, shape=[3, 7])
    b = g.op("Neg", a, shape=[3, 7])
    y = g.op("Add", a, b, shape=[3, 7])
    z = g.op("Softmax", a, shape=[3, 7])  # a also leaves the group
    model = g.model(y, z)
    feeds = {"x": torch.randn(3, 7)}
    want = _run(model, feeds)
    assert _fuse(model).stats == {"groups": 1, "nodes": 3, "refused": 0}
    (node,) = [n for n in model.graph if is_fused(n)]
    assert [v.name for v in node.outputs] == ["n0_Relu", "n2_Add"]
    assert all(torch.equal(a, b) for a, b in zip(_run(model, feeds), want, strict=True))


@pytest.mark.parametrize(
    "other, why",
    [
        ([3, 1], "'w' [3,1] broadcasts against the output [2,3,4]"),  # a column
        ([2, 1, 4], "'w' [2,1,4]"),  # broadcast over a middle dim
        (["m", 3, 4], "'w' [m,3,4]"),  # another symbol: not provably the same size
        ([None, 3, 4], "unknown"),  # an unknown dim matches nothing
    ],
)
def test_a_broadcast_the_kernel_cannot_index_is_left_alone(other, why):
    g = _Graph()
    x = g.input("x", ["n", 3, 4] if other[0] in ("m", None) else [2, 3, 4])
    w = g.input("w", other)
    out_shape = ["n", 3, 4] if other[0] in ("m", None) else [2, 3, 4]
    y = g.op("Relu", g.op("Add", x, w, shape=out_shape), shape=out_shape)
    model = g.model(y)
    result = _fuse(model)
    assert not _groups(model)
    assert any(why in n and "n0_Add" in n for n in result.notes), result.notes


def test_symbolic_dims_with_the_same_name_fuse():
    g = _Graph()
    x, w = g.input("x", ["n", 4]), g.input("w", ["n", 4])
    y = g.op("Relu", g.op("Add", x, w, shape=["n", 4]), shape=["n", 4])
    model = g.model(y)
    assert _fuse(model).stats["groups"] == 1


def test_inputs_of_two_float_dtypes_are_not_one_kernel():
    g = _Graph()
    x, y = g.input("x", [4, 8], F16), g.input("y", [4, 8], F32)
    c = g.op("Cast", x, shape=[4, 8], attrs=[ir.AttrInt64("to", F32)])
    model = g.model(g.op("Add", c, y, shape=[4, 8]))
    result = _fuse(model)
    assert not _groups(model)
    assert any("FLOAT16" in n and "one dtype" in n for n in result.notes)


def _mixed_chain():
    """fp16 x with a row bias, a [1,1,8] scale and scalars, a Pow by a constant, a Where on a
    bool mask, a Cast to fp32 and a second (fp16) output; nothing here is a multiple of a block."""
    g = _Graph()
    x, mask = g.input("x", [1, 3, 8], F16), g.input("mask", [1, 3, 8], BOOL)
    bias = g.const("bias", np.linspace(-1, 1, 8).astype(np.float16))
    scale = g.const("scale", np.full((1, 1, 8), 0.5, np.float16))
    two, fill = (
        g.const("two", np.array(2.0, np.float16)),
        g.const("fill", np.array([-3.0], np.float16)),
    )
    s = [1, 3, 8]
    h = g.op("Mul", g.op("Add", x, bias, shape=s, dtype=F16), scale, shape=s, dtype=F16)
    sq = g.op("Pow", h, two, shape=s, dtype=F16)
    picked = g.op("Where", mask, sq, fill, shape=s, dtype=F16)
    out = g.op("Cast", picked, shape=s, dtype=F32, attrs=[ir.AttrInt64("to", F32)])
    feeds = {"x": torch.randn(1, 3, 8).half(), "mask": torch.rand(1, 3, 8) > 0.3}
    return g.model(out, h), feeds


def test_pointwise_binder_runs_a_mixed_group_like_the_reference(monkeypatch):
    pytest.importorskip("triton")
    from kompakt.codegen.pointwise import kernel as pointwise_kernel

    model, feeds = _mixed_chain()
    want = _run(model, feeds)
    assert _fuse(model).stats == {"groups": 1, "nodes": 5, "refused": 0}
    chains = []
    launch = pointwise_kernel.launch_chain
    monkeypatch.setattr(
        pointwise_kernel, "launch_chain", lambda c, *t: chains.append(c) or launch(c, *t)
    )
    got, summary = _run(model, feeds, backend="triton")
    assert "pointwise x1" in summary and "fell back" not in summary
    assert [t.dtype for t in got] == [torch.float32, torch.float16]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # fp16 storage between ops
    # the constant exponent reaches the kernel as an attr (rendered x*x), not a run-time arg
    (pow_step,) = [s for s in chains[0].steps if s.op == "Pow"]
    assert pow_step.args == (pow_step.args[0],) and pow_step.attr("exponent") == 2.0


def test_groups_the_family_cannot_run_fall_back_to_torch_with_the_reason():
    pytest.importorskip("triton")
    assert binder_for("pointwise") is not None
    g = _Graph()
    x = g.input("x", [2, 6])
    c = g.op("Cos", x, shape=[2, 6])
    y = g.op("Add", c, x, shape=[2, 6])
    model = g.model(y)
    fuse_nodes(model, list(model.graph), "pointwise")  # by hand: the pass would not take Cos
    feeds = {"x": torch.randn(2, 6)}
    (got,), summary = _run(model, feeds, backend="triton")
    assert "triton kernels: none" in summary and "FusedKernel[pointwise] x1" in summary
    assert "fell back to torch" in summary and "'Cos' is not supported" in summary
    torch.testing.assert_close(got, torch.cos(feeds["x"]) + feeds["x"])
