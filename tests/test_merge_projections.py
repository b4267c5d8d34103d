"""merge-projections: Llama's q/k/v and gate/up as one GEMM each, with the same numbers."""

from __future__ import annotations

import collections
import json

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import first_output

import kompakt
import kompakt.passes.fuse.merge_projections  # noqa: F401  (registers the pass)
from kompakt.errors import PipelineError
from kompakt.ir.builder import constant
from kompakt.ir.fused import body_of, is_fused
from kompakt.ir.metadata import module_of, set_module
from kompakt.passes.fuse.merge_projections import MERGED_KEY

FLOAT = "canonicalize,infer-shapes"
QUANT = FLOAT + ",quantize-weights{bits=4,group-size=16}"
QKV = ["q_proj", "k_proj", "v_proj"]
GATE_UP = ["gate_proj", "up_proj"]


def _compile(model, pipeline, backend="reference", **options):
    return kompakt.compile(
        model, target="a100", pipeline=pipeline, backend=backend, progress=False, **options
    )


def _notes(cm, name="merge-projections"):
    return [n for r in cm.report().passes if r.name == name for n in r.result.notes]


@pytest.mark.parametrize("pipeline", [FLOAT, QUANT], ids=["float", "int4"])
def test_llama_projections_merge_per_layer(captured, pipeline):
    plain = _compile(captured("llama"), pipeline)
    cm = _compile(captured("llama"), pipeline + ",merge-projections")
    splits = [n for n in cm.ir.graph if n.op_type == "Split"]
    merged = [json.loads(n.metadata_props[MERGED_KEY]) for n in splits]
    leaves = [[m.rsplit(".", 1)[-1] for m in group] for group in merged]
    assert leaves == [QKV, GATE_UP, QKV, GATE_UP]  # 3 -> 1 and 2 -> 1 in each of 2 layers
    assert [len(n.outputs) for n in splits] == [3, 2, 3, 2]
    matmuls = collections.Counter(n.op_type for n in plain.ir.graph)["MatMul"]
    assert collections.Counter(n.op_type for n in cm.ir.graph)["MatMul"] == matmuls - 6
    for split in splits:  # the module path of the first projection, and the widened MatMul
        producer = split.inputs[0].producer()
        assert module_of(producer).endswith(("q_proj", "gate_proj"))
        assert MERGED_KEY in producer.metadata_props
    lm_head = next(n for n in cm.ir.graph if module_of(n) == "lm_head")
    assert lm_head.op_type == "MatMul" and MERGED_KEY not in lm_head.metadata_props
    assert not any(".q_proj." in name for name in cm.ir.graph.initializers)  # old weights gone
    if pipeline == QUANT:
        dq = [n for n in cm.ir.graph if n.op_type == "DequantizeLinear"]
        assert len(dq) == 8  # per layer: qkv, o, gate_up, down
        qkv = next(n for n in dq if MERGED_KEY in n.metadata_props)
        assert list(qkv.inputs[0].shape) == [64, 128]  # q 64 + k 32 + v 32 columns
        assert list(qkv.inputs[1].shape) == [4, 128]  # one scale row per 16-row group
        assert qkv.inputs[0].dtype in (ir.DataType.UINT4, ir.DataType.INT4)
    records = [r for r in cm.report().passes if r.name == "merge-projections"][0].result.records
    assert [r["split"] for r in records] == [[64, 32, 32], [128, 128]] * 2
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        # a wider GEMM may sum K in another order: allow a few ulps
        torch.testing.assert_close(
            first_output(cm(ids)), first_output(plain(ids)), rtol=1e-6, atol=1e-6
        )


def test_merged_projections_fuse_and_run_on_triton(captured):
    pytest.importorskip("triton")
    pipeline = QUANT + ",merge-projections,fuse-dequant-matmul"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = _compile(captured("llama"), pipeline, device=device)
    fused = [n for n in reference.ir.graph if is_fused(n)]
    assert len(fused) == 8  # 2 layers x (qkv, o, gate_up, down), down from 14 unmerged
    wide = [n for n in fused if any(MERGED_KEY in b.metadata_props for b in body_of(n))]
    assert len(wide) == 4
    acts = sorted(node.attributes["act"].as_string() for node in wide)
    assert acts == ["glu_silu", "glu_silu", "none", "none"]
    for node in wide:
        if node.attributes["act"].as_string() == "none":  # q/k/v: the Split reads the output
            assert [u.node.op_type for u in node.outputs[0].uses()] == ["Split"]
        else:  # gate/up: its Split and SwiGLU are the epilogue
            assert [n.op_type for n in body_of(node)][-4:] == ["Split", "Sigmoid", "Mul", "Mul"]
    unmerged = _compile(captured("llama"), QUANT)
    triton = _compile(captured("llama"), pipeline, backend="triton", device=device)
    ids = tokens(EXAMPLE_SHAPE)
    want = first_output(reference(ids))
    torch.testing.assert_close(want, first_output(unmerged(ids)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first_output(triton(ids)).cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    assert "dequant_matmul x8" in triton._backend.summary()


def test_export_is_standard_onnx_that_onnxruntime_runs(captured, tmp_path):
    cm = _compile(captured("llama"), QUANT + ",merge-projections,fuse-dequant-matmul")
    path = cm.export_onnx(tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    assert not any(n.domain == "kompakt" for n in proto.graph.node)
    assert sum(n.op_type == "Split" for n in proto.graph.node) == 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = tokens(EXAMPLE_SHAPE)
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), first_output(cm(ids)), rtol=1e-3, atol=2e-2)


def test_min_group_leaves_smaller_groups_alone(captured):
    cm = _compile(captured("llama"), FLOAT + ",merge-projections{min-group=3}")
    splits = [n for n in cm.ir.graph if n.op_type == "Split"]
    assert [len(n.outputs) for n in splits] == [3, 3]  # q/k/v only; gate/up is a pair
    with pytest.raises(PipelineError, match="min-group"):
        _compile(captured("llama"), FLOAT + ",merge-projections{min-group=1}")


# A hand-built graph: projections of one x [m, 32], each with 16 output columns. Each spec is a
# block size for an int4 weight (0: per-channel scales), or None for a float weight.
def _projections(specs, modules=("attn.q_proj", "attn.k_proj"), tied=False) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["m", 32]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21})
    gen = torch.Generator().manual_seed(0)
    for i, (block, module) in enumerate(zip(specs, modules, strict=True)):
        if block is None:
            weight = constant(graph, torch.randn(32, 16, generator=gen), f"w{i}")
        else:
            codes = torch.randint(-8, 8, (32, 16), generator=gen, dtype=torch.int8)
            q = constant(graph, codes, f"w{i}_q", dtype=ir.DataType.INT4)
            shape = (32 // block, 16) if block else (16,)
            s = constant(graph, torch.rand(*shape, generator=gen) + 0.5, f"w{i}_scale")
            attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
            dq = ir.node("DequantizeLinear", [q, s], attrs, name=f"dq{i}")
            set_module(dq, module)
            graph.append(dq)
            weight = dq.outputs[0]
            weight.name = f"w{i}"
        mm = ir.node("MatMul", [x, weight], name=f"mm{i}")
        y = mm.outputs[0]
        y.name, y.type, y.shape = f"y{i}", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["m", 16])
        set_module(mm, module)
        graph.append(mm)
        graph.outputs.append(y)
        if tied and i == 0:  # the weight has a second reader, as a tied embedding would
            graph.append(ident := ir.node("Identity", [weight], name="tie"))
            ident.outputs[0].name = "tied"
            graph.outputs.append(ident.outputs[0])
    return ir.Model(graph, ir_version=10)


def _run_pass(model):
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    plain = _compile(model, "infer-shapes", estimate_latency=False)
    cm = _compile(model, "merge-projections", estimate_latency=False)
    for got, want in zip(cm(x), plain(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    return cm


@pytest.mark.parametrize("specs", [[16, 16], [0, 0, 0], [None, None]], ids=str)
def test_same_form_merges_and_graph_outputs_keep_their_names(specs):
    modules = [f"attn.p{i}" for i in range(len(specs))]
    cm = _run_pass(_projections(specs, modules))
    ops = ["MatMul", "Split"] if specs[0] is None else ["DequantizeLinear", "MatMul", "Split"]
    assert [n.op_type for n in cm.ir.graph] == ops
    assert [v.name for v in cm.ir.graph.outputs] == [f"y{i}" for i in range(len(specs))]
    base = "attn." + "_".join(p.split(".")[1] for p in modules)
    names = [".weight"] if specs[0] is None else [".weight_quantized", ".weight_scale"]
    assert sorted(cm.ir.graph.initializers) == sorted(base + s for s in [".split_sizes", *names])


@pytest.mark.parametrize(
    "specs, why",
    [([16, 32], "block_size 32 vs 16"), ([16, 0], "axis 1 vs 0"), ([16, None], "weight float")],
)
def test_weights_of_different_forms_are_not_merged(specs, why):
    cm = _run_pass(_projections(specs))
    assert not any(n.op_type == "Split" for n in cm.ir.graph)
    (note,) = _notes(cm)
    assert note.startswith("attn.k_proj: not merged: weights differ") and why in note


@pytest.mark.parametrize(
    "modules, tied, why",
    [
        (("attn.q_proj", "lm_head"), False, "lm_head: not merged: the output projection"),
        (("attn.q_proj", "attn.k_proj"), True, "attn.q_proj: not merged: its weight has another"),
    ],
)
def test_output_projection_and_tied_weights_are_left_alone(modules, tied, why):
    cm = _run_pass(_projections([16, 16], modules, tied=tied))
    assert not any(n.op_type == "Split" for n in cm.ir.graph)
    (note,) = _notes(cm)
    assert note.startswith(why)


def test_bias_adds_stay_after_the_split(captured):
    cm = _compile(captured("qwen2"), FLOAT + ",merge-projections")
    splits = [n for n in cm.ir.graph if n.op_type == "Split"]
    assert [len(n.outputs) for n in splits] == [3, 2, 3, 2]
    qkv = splits[0].outputs
    consumers = [[u.node.op_type for u in v.uses()] for v in qkv]
    assert consumers == [["Add"]] * 3  # Qwen2's q/k/v biases, one Add per projection
    plain = _compile(captured("qwen2"), FLOAT)
    ids = tokens(EXAMPLE_SHAPE)
    torch.testing.assert_close(
        first_output(cm(ids)), first_output(plain(ids)), rtol=1e-6, atol=1e-6
    )
