"""The steps around a pointwise kernel: the on-disk kernel cache, reading ONNX bodies
(from_ir), and ahead-of-time builds for sm_80 / sm_90 (no GPU needed)."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from kompakt.codegen.aot import compile_variants
from kompakt.codegen.pointwise import (
    Chain,
    Config,
    Operand,
    Step,
    aot_variants,
    chain_from_graph,
    render,
    source_hash,
)
from kompakt.codegen.pointwise import cache as kcache
from kompakt.codegen.pointwise.kernel import launch_chain
from kompakt.codegen.pointwise.spec import aot_chains
from kompakt.errors import CodegenError

SMALL = Config(BLOCK=32, num_warps=1)  # several programs even for tiny tensors
FULL = Operand("full")
SILU_MUL = Chain(  # x * sigmoid(x) * u
    (FULL, FULL), (Step("Sigmoid", (0,)), Step("Mul", (0, 2)), Step("Mul", (3, 1))), (4,)
)
BIAS_RELU = Chain((FULL, Operand("row")), (Step("Add", (0, 1)), Step("Relu", (2,))), (3,))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE_DIR", str(tmp_path / "kernels"))


def test_cache_hit_does_not_rewrite(tmp_path):
    source = render(BIAS_RELU, "fp32")
    fn = kcache.load_kernel(source)
    path = kcache.cache_dir() / f"pointwise_{source_hash(source)[:16]}.py"
    assert path.parent == tmp_path / "kernels" and path.read_text() == source
    before = os.stat(path)
    assert kcache.load_kernel(source) is fn  # memoized in this process
    kcache.clear_memory_cache()  # as a new process: the file is reused, not rewritten
    kcache.load_kernel(source)
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert kcache.load_cached(path.stem).__name__ == "pointwise_kernel"


def test_cache_rewrites_a_file_that_does_not_match(tmp_path):
    source = render(SILU_MUL, "fp32")
    path = kcache.write_source(source)
    path.write_text("raise SystemExit('not what we rendered')\n")
    with pytest.raises(CodegenError, match="does not match"):
        kcache.load_cached(path.stem)
    kcache.clear_memory_cache()
    fn = kcache.load_kernel(source)  # re-written from the source, then run
    assert path.read_text() == source and fn.__name__ == "pointwise_kernel"
    x, u = torch.randn(2, 3), torch.randn(2, 3)
    (got,) = launch_chain(SILU_MUL, x, u)
    torch.testing.assert_close(got, F.silu(x) * u)
    with pytest.raises(CodegenError, match="not a cached pointwise kernel"):
        kcache.load_cached("../etc/passwd")


def _value(name, shape):
    return ir.val(name, ir.DataType.FLOAT, shape)


def _scalar_initializer(name, number):
    tensor = ir.tensor(np.array(number, dtype=np.float32), name=name)
    return ir.Value(
        name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor
    )


def test_from_ir_erf_gelu_silu_and_friends():
    x, bias = _value("x", ["batch", 6]), _value("bias", [6])
    half = _value("half", [])  # a scalar that arrives as a body input (role 'scalar')
    sqrt2 = _scalar_initializer("sqrt2", np.sqrt(2.0))
    add = ir.node("Add", [x, bias], name="add")
    div = ir.node("Div", [add.outputs[0], sqrt2], name="div")
    erf = ir.node("Erf", [div.outputs[0]], name="erf")
    one = ir.node("Constant", [], attributes={"value_float": 1.0}, name="one")
    plus = ir.node("Add", [erf.outputs[0], one.outputs[0]], name="plus")
    times = ir.node("Mul", [add.outputs[0], half], name="times")
    gelu = ir.node("Mul", [times.outputs[0], plus.outputs[0]], name="gelu")  # x*0.5*(1+erf)
    sig = ir.node("Sigmoid", [gelu.outputs[0]], name="sig")
    silu = ir.node("Mul", [gelu.outputs[0], sig.outputs[0]], name="silu")  # x*Sigmoid(x)
    onnx_gelu = ir.node("Gelu", [silu.outputs[0]], attributes={"approximate": "tanh"})
    three = _scalar_initializer("three", 3.0)
    cube = ir.node("Pow", [onnx_gelu.outputs[0], three], name="cube")
    low = _value("low", [1])
    clip = ir.node("Clip", [cube.outputs[0], low, None], name="clip")
    cast = ir.node("Cast", [clip.outputs[0]], attributes={"to": ir.DataType.FLOAT16})
    nodes = [add, div, erf, one, plus, times, gelu, sig, silu, onnx_gelu, cube, clip, cast]
    outputs = [silu.outputs[0], cast.outputs[0]]
    body = ir.Graph([x, bias, half, low], outputs, nodes=nodes, initializers=[sqrt2, three])

    chain = chain_from_graph(body)
    assert [o.role for o in chain.inputs] == ["full", "row", "scalar", "scalar"]
    assert [s.op for s in chain.steps] == [
        "Add", "Constant", "Div", "Erf", "Constant", "Add", "Mul", "Mul", "Sigmoid", "Mul",
        "Gelu", "Pow", "Max", "Cast",
    ]  # fmt: skip
    assert chain.steps[11].attr("exponent") == 3.0  # a constant exponent becomes an attr
    assert chain.out_dtypes("fp32") == ("fp32", "fp16")

    args = (torch.randn(4, 6), torch.randn(6), torch.tensor(0.5), torch.tensor([-0.1]))
    got = launch_chain(chain, *args, config=SMALL)
    h = F.gelu(args[0] + args[1])
    s = F.silu(h)
    want = (s, torch.maximum(F.gelu(s, approximate="tanh") ** 3, args[3]).half())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=2e-3, atol=2e-3)


def test_from_ir_unsupported_op_names_node_and_op():
    x = _value("x", [2, 3])
    relu = ir.node("Relu", [x], name="relu")
    soft = ir.node("Softmax", [relu.outputs[0]], attributes={"axis": -1}, name="soft")
    body = ir.Graph([x], [soft.outputs[0]], nodes=[relu, soft])
    with pytest.raises(CodegenError, match=r"node 'soft' \(Softmax\).*not supported"):
        chain_from_graph(body)
    y, col = _value("y", [2, 3]), _value("col", [2, 1])  # a column broadcast is not a role
    add = ir.node("Add", [y, col], name="add")
    with pytest.raises(CodegenError, match="body input 'col' has shape"):
        chain_from_graph(ir.Graph([y, col], [add.outputs[0]], nodes=[add]))


def test_aot_sm80_sm90():
    labels = [label for label, _, _ in aot_chains()] * 2
    variants = aot_variants("sm_80") + aot_variants("sm_90")
    built = compile_variants(variants)
    assert len(built) == 6
    for label, b in zip(labels, built, strict=True):
        print(f"{label}: {b.summary()}")
        assert b.ptx and b.registers > 0
        assert b.spill_stores == 0 and b.spill_loads == 0  # elementwise: no reason to spill
        assert not b.uses_mma and not b.uses_wgmma  # no tl.dot in a pointwise kernel
        assert "ld.global" in b.ptx and "st.global" in b.ptx
        assert b.widest_load_bits == 128 and b.registers <= 64  # 16 bytes a thread per access
