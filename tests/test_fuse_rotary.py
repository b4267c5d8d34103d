"""fuse-rotary and the rotary binder: what is grouped, that nothing changes, the Triton kernel."""

from __future__ import annotations

import collections
import warnings

import onnx_ir as ir
import pytest
import torch
import transformers as hf
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import (
    assert_exports_standard_onnx,
    assert_same_as_unfused,
    compile_for_gpu,
    first_output,
)
from onnx import TensorProto, helper, numpy_helper

import kompakt.passes.fuse.fuse_attention  # noqa: F401  (registers fuse-attention)
import kompakt.passes.fuse.fuse_rotary  # noqa: F401  (registers fuse-rotary)
from kompakt.codegen.rotary.bind import bind
from kompakt.errors import CodegenError
from kompakt.ir.fused import is_fused, pattern_of

PLAIN = "canonicalize,infer-shapes"
ROT = PLAIN + ",fuse-rotary{pair=false}"  # one group per rotated tensor
PAIRED = PLAIN + ",fuse-rotary"  # q and k of a layer in one node
QUANT = PLAIN + ",quantize-weights{bits=4,group-size=16},fuse-dequant-matmul,fuse-norm"
ALL = QUANT + ",fuse-rotary,fuse-attention"
ALL_SWAPPED = QUANT + ",fuse-attention,fuse-rotary"  # the groups do not overlap: either order
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG = 2**63 - 1  # torch.onnx's "to the end" Slice bound


def _groups(model):
    return [n for n in model.graph if is_fused(n) and pattern_of(n) == "rotary"]


def _notes(cm):
    return [n for r in cm.report().passes if r.name == "fuse-rotary" for n in r.result.notes]


def _input(node, role):
    return node.inputs[list(node.attributes["roles"].as_strings()).index(role)]


def _check_groups(cm, heads, head_dim, rotary_dim):
    groups = _groups(cm.ir)
    assert sorted(_input(n, "x").shape[1] for n in groups) == sorted(heads)
    for node in groups:
        roles = list(node.attributes["roles"].as_strings())
        assert {"x", "cos", "sin", "bound"} == set(roles)
        assert node.attributes["rotary_dim"].value == rotary_dim
        assert _input(node, "x").shape[3] == head_dim
        assert list(_input(node, "cos").shape)[1:] == [1, "sequence", rotary_dim]
    assert not [n.op_type for n in cm.ir.graph if n.op_type == "Neg"]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_two_groups_per_layer_computing_exactly_what_the_unfused_model_does(captured, name):
    cm = compile_for_gpu(captured(name), ROT)
    _check_groups(cm, heads=[4, 2, 4, 2], head_dim=16, rotary_dim=16)  # q and k of 2 layers
    plain = compile_for_gpu(captured(name), PLAIN)
    assert_same_as_unfused(cm, plain, (EXAMPLE_SHAPE, OTHER_SHAPE))


def test_partial_rotary_of_gpt_neox_takes_the_pass_through_into_the_group():
    torch.manual_seed(0)
    config = hf.GPTNeoXConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        rotary_pct=0.5,  # head dim 16, rotary dim 8: Slice(:8) / Slice(8:) / Concat around it
        max_position_embeddings=128,
    )
    from kompakt.lowering import capture_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture_module(hf.GPTNeoXForCausalLM(config).eval(), (tokens(EXAMPLE_SHAPE),))
    cm = compile_for_gpu(model, ROT)
    _check_groups(cm, heads=[4, 4], head_dim=16, rotary_dim=8)
    for node in _groups(cm.ir):
        body_ops = collections.Counter(n.op_type for n in node.attributes["body"].as_graph())
        assert body_ops == {"Slice": 4, "Concat": 2, "Neg": 1, "Mul": 2, "Add": 1}
    plain = compile_for_gpu(model, PLAIN)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        assert torch.equal(first_output(cm(ids)), first_output(plain(ids)))
    pytest.importorskip("triton")
    triton = compile_for_gpu(model, ROT, backend="triton", device=DEVICE)
    ids = tokens(OTHER_SHAPE)
    got, want = first_output(triton(ids)), first_output(cm(ids))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert "rotary x2" in triton._backend.summary()


def test_export_is_standard_onnx_that_onnxruntime_runs(captured, tmp_path):
    cm = compile_for_gpu(captured("llama"), ROT)
    assert_exports_standard_onnx(cm, tmp_path, tokens(OTHER_SHAPE))


@pytest.mark.parametrize(
    "name, pipeline",
    [("llama", ROT), ("qwen2", ROT), ("llama", ALL), ("qwen2", ALL_SWAPPED)],
)
def test_triton_backend_runs_the_rotary_kernel(captured, name, pipeline):
    pytest.importorskip("triton")
    triton = compile_for_gpu(captured(name), pipeline, backend="triton", device=DEVICE)
    reference = compile_for_gpu(captured(name), pipeline, device=DEVICE)
    for shape in (EXAMPLE_SHAPE, (1, 1)):  # batch 1, sequence 1: decode's one position
        ids = tokens(shape)
        got, want = first_output(triton(ids)), first_output(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    summary = triton._backend.summary()
    launches = "rotary x4" if pipeline == ROT else "rotary x2"  # q, k of 2 layers; or paired
    assert launches in summary and "fell back" not in summary
    if pipeline != ROT:  # attention reads the rotary outputs as q and k
        assert "attention x2" in summary and "dequant_matmul x" in summary and "norm x5" in summary


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_q_and_k_of_a_layer_pair_into_one_node_and_one_launch(captured, name):
    """The default pairs each layer's q and k (the same tables): one node with roles x and x2
    and two outputs, the same numbers as the unfused model, one kernel launch."""
    cm = compile_for_gpu(captured(name), PAIRED)
    groups = _groups(cm.ir)
    assert len(groups) == 2  # one per layer
    for node in groups:
        roles = list(node.attributes["roles"].as_strings())
        assert {"x", "x2", "cos", "sin"} <= set(roles) and len(node.outputs) == 2
        assert [_input(node, r).shape[1] for r in ("x", "x2")] in ([4, 2], [2, 4])
    plain = compile_for_gpu(captured(name), PLAIN)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        assert torch.equal(first_output(cm(ids)), first_output(plain(ids)))
    assert cm.report().passes[-1].result.stats["launches"] == 2
    pytest.importorskip("triton")
    triton = compile_for_gpu(captured(name), PAIRED, backend="triton", device=DEVICE)
    ids = tokens(OTHER_SHAPE)
    torch.testing.assert_close(
        first_output(triton(ids)).cpu(), first_output(cm(ids)).cpu(), rtol=1e-5, atol=1e-5
    )
    assert "rotary x2" in triton._backend.summary()


def _rope(v, cos, sin):
    half = v.shape[-1] // 2
    return v * cos + torch.cat((-v[..., half:], v[..., :half]), dim=-1) * sin


def _paired(module, *shapes):
    """Compiles ``module`` with pairing; returns the launches and whether it computes the same."""
    args = tuple(torch.randn(*shape) for shape in shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = compile_for_gpu(module, PAIRED, example_inputs=args)
    got, want = cm(*args), module(*args)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    same = all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
    return cm.report().passes[-1].result.stats["launches"], same


class _Twice(torch.nn.Module):
    def forward(self, x, cos, sin):  # the second rotation reads the first's result
        return _rope(_rope(x, cos, sin), cos, sin)


class _LoneThenPair(torch.nn.Module):
    def forward(self, x, cos, sin):  # a rotation nothing pairs with, then a q/k of the next layer
        a = _rope(x, cos, sin)
        return _rope(a * 2.0, cos, sin), _rope(a[:, :1] * 3.0, cos, sin)


class _TwoTableKinds(torch.nn.Module):
    def forward(self, xa, xd, c1, s1, c2, s2):  # pairs (a, b) and (d, c) cross-depend
        a = _rope(xa, c1, s1)
        d = _rope(xd, c2, s2)
        c = _rope(a[..., :4] + 1, c2, s2)
        b = _rope(torch.cat([d, d], -1) * 2, c1, s1)
        return b, c


def test_pairs_never_make_a_node_feed_itself_and_do_not_get_stuck():
    """A rotation of a rotation stays two nodes; a lone rotation does not keep the next layer's
    q and k from pairing; and a pair that an earlier fused pair made depend on itself is fused
    as two nodes (found when it is fused, not when pairs are chosen)."""
    assert _paired(_Twice(), (2, 3, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)) == (2, True)
    assert _paired(_LoneThenPair(), (1, 4, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)) == (2, True)
    shapes = [(1, 2, 5, 8), (1, 2, 5, 4), (1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 4), (1, 1, 5, 4)]
    assert _paired(_TwoTableKinds(), *shapes) == (3, True)


# Hand-built graphs in torch.onnx's spelling: the tables' shapes, partial rotary, near misses.
HEADS = 3


def _rope_model(
    d=24, r=None, lo=None, hi=None, swap=False, table=("one", 1, "s", None), fp16=False
):
    """y = x * cos + rotate_half(x) * sin on x [b, HEADS, s, d]; partial when r < d.

    ``lo`` / ``hi``: the (start, end) of the plain and the negated Slice; ``swap``: Concat(plain,
    Neg) instead of Concat(Neg, plain); ``table``: cos/sin's shape ("one" is the literal 1,
    None is r).
    """
    r = r or d
    lo, hi = lo or (0, r // 2), hi or (r // 2, BIG)
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dims = [1 if t == "one" else r if t is None else t for t in table]
    inits, nodes = {}, []

    def const(*values):
        name = "c_" + "_".join(map(str, values))
        inits[name] = numpy_helper.from_array(torch.tensor(values).numpy(), name)
        return name

    def slice_(src, out, start, end, axis, step=True):
        bounds = [const(start), const(end), const(axis)] + ([const(1)] if step else [])
        nodes.append(helper.make_node("Slice", [src, *bounds], [out]))

    xr = "x"
    if r < d:  # as GPT-NeoX: x_rot = x[..., :r], x_pass = x[..., r:]
        slice_("x", "x_rot", 0, r, -1)
        slice_("x", "x_pass", r, BIG, -1, step=False)
        xr = "x_rot"
    slice_(xr, "x1", *lo, 3)
    slice_(xr, "x2", *hi, 3, step=False)
    cat = ["x1", "nx2"] if swap else ["nx2", "x1"]
    nodes += [
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", cat, ["rot"], axis=-1),
        helper.make_node("Mul", [xr, "cos"], ["xc"]),
        helper.make_node("Mul", ["rot", "sin"], ["rs"]),
        helper.make_node("Add", ["xc", "rs"], ["y" if r == d else "y_rot"]),
    ]
    if r < d:
        nodes.append(helper.make_node("Concat", ["y_rot", "x_pass"], ["y"], axis=-1))
    inputs = [helper.make_tensor_value_info("x", ft, ["b", HEADS, "s", d])]
    inputs += [helper.make_tensor_value_info(n, ft, dims) for n in ("cos", "sin")]
    outputs = [helper.make_tensor_value_info("y", ft, ["b", HEADS, "s", d])]
    graph = helper.make_graph(nodes, "rope", inputs, outputs, list(inits.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _feeds(model, batch, seq, dtype):
    gen = torch.Generator().manual_seed(batch * 10 + seq)
    sizes = {"b": batch, "s": seq}
    feeds = []
    for value in model.graph.input:
        shape = [d.dim_value or sizes[d.dim_param] for d in value.type.tensor_type.shape.dim]
        feeds.append(torch.randn(*shape, generator=gen).to(dtype))  # unequal table halves too
    return feeds


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # D = 24: a block of 16 masked
        {"r": 12, "table": ("one", "s", None)},  # partial rotary, 3-D tables
        {"d": 16, "table": ("s", None)},  # [S, R] tables
        {"fp16": True, "table": ("b", 1, "s", None)},  # per-batch tables
    ],
)
def test_hand_built_rotary_runs_on_triton(kwargs):
    pytest.importorskip("triton")
    model = _rope_model(**kwargs)
    cm = compile_for_gpu(model, ROT)
    (node,) = _groups(cm.ir)
    assert node.attributes["rotary_dim"].value == kwargs.get("r", kwargs.get("d", 24))
    triton = compile_for_gpu(model, ROT, backend="triton", device=DEVICE)
    dtype = torch.float16 if kwargs.get("fp16") else torch.float32
    tol = 1e-3 if kwargs.get("fp16") else 1e-5  # fp16: the body rounds 3 times, the kernel once
    for batch, seq in ((2, 5), (1, 1)):
        feeds = [t.to(DEVICE) for t in _feeds(model, batch, seq, dtype)]
        torch.testing.assert_close(triton(*feeds).cpu(), cm(*feeds).cpu(), rtol=tol, atol=tol)
    assert "rotary x1" in triton._backend.summary()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"lo": (0, 11), "hi": (11, BIG)}, "slices [0:11] and -[11:24] are not the halves"),
        ({"lo": (12, BIG), "hi": (0, 12)}, "slices [12:24] and -[0:12] are not"),  # Neg of x1
        ({"swap": True}, "the Neg is on the Concat's second operand"),
        ({"table": ("one", 1, 1, None)}, "cos/sin [1, 1, 1, 24] are not"),  # broadcast over S
        ({"table": ("one", 1, "s", 1)}, "cos/sin [1, 1, s, 1] are not"),  # broadcast over R
        # [B, S, R] broadcasts against x from the right: its B meets the heads (b = 3 here)
        ({"table": ("b", "s", None)}, "cos/sin [b, s, 24] are not"),
    ],
)
def test_near_misses_are_left_alone_with_a_note(kwargs, reason):
    model = _rope_model(**kwargs)
    cm = compile_for_gpu(model, ROT)
    assert not _groups(cm.ir)
    assert any(reason in note for note in _notes(cm)), _notes(cm)
    feeds = _feeds(model, HEADS, 5, torch.float32)  # b = HEADS: the [b, s, R] case broadcasts
    assert torch.equal(cm(*feeds), compile_for_gpu(model, PLAIN)(*feeds))


def _set_roles(node, renames):
    roles = [renames.get(r, r) for r in node.attributes["roles"].as_strings()]
    node.attributes["roles"] = ir.AttrStrings("roles", roles)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda n: n.attributes.pop("roles"), "'roles' must name"),
        (lambda n: _set_roles(n, {"x": "bound"}), "no input has the role 'x'"),
        (lambda n: _set_roles(n, {"cos": "table"}), "unknown role 'table'"),
        (lambda n: n.attributes.__setitem__("rotary_dim", ir.AttrInt64("rotary_dim", 15)), "15"),
        (lambda n: n.attributes.__setitem__("rotary_dim", ir.AttrInt64("rotary_dim", 32)), "32"),
        (lambda n: setattr(_input(n, "x"), "type", ir.TensorType(ir.DataType.INT64)), "x '"),
        (lambda n: setattr(_input(n, "sin"), "shape", ir.Shape([1, 1, 7, 24])), "sin '"),
        (
            lambda n: setattr(n.outputs[0], "type", ir.TensorType(ir.DataType.FLOAT16)),
            "the kernel writes",
        ),
    ],
)
def test_binder_rejects_what_the_kernel_cannot_take(edit, message):
    pytest.importorskip("triton")
    (node,) = _groups(compile_for_gpu(_rope_model(), ROT).ir)
    bind(node, torch.device(DEVICE))  # binds as built
    edit(node)
    with pytest.raises(CodegenError, match=message):
        bind(node, torch.device(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_llama_sizes_on_gpu(fp16):
    model = _rope_model(d=128)  # Llama: D = R = 128; 3 heads, a long prefill
    triton = compile_for_gpu(model, ROT, backend="triton", device="cuda")
    reference = compile_for_gpu(model, ROT, device="cuda")
    dtype = torch.float16 if fp16 else torch.float32
    feeds = [t.cuda() for t in _feeds(model, 4, 1000, dtype)]
    tol = 2e-3 if fp16 else 1e-5
    torch.testing.assert_close(triton(*feeds), reference(*feeds), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def cache_graph(tiny):
    """A tiny Llama captured with a 16-slot static KV cache (kompakt.lowering.kv_cache)."""
    from kompakt.lowering.kv_cache import capture_with_cache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_with_cache(tiny("llama"), batch=1, max_length=16)


def _decode_feeds(spec, position, seq=1):
    g = torch.Generator().manual_seed(position)
    caches = {n: torch.randn(c.shape, generator=g) for n, c in spec.empty_caches(1).items()}
    positions = torch.arange(position, position + seq)
    return {"input_ids": tokens((1, seq)), "cache_position": positions, **caches}


def test_a_pair_takes_its_layer_kv_cache_writes_in(cache_graph):
    """append_kv (the default): each layer's rotary node also writes k and v into the caches:
    outputs q's rotation and the two updated caches, no ScatterND left, the same numbers as
    the unfused graph (prefill and decode), and append_kv=false leaves the writes alone."""
    graph, spec = cache_graph
    cm = compile_for_gpu(graph, PAIRED)
    plain = compile_for_gpu(graph, PLAIN)
    groups = _groups(cm.ir)
    assert len(groups) == spec.num_layers
    assert not [n for n in cm.ir.graph if n.op_type == "ScatterND"]
    assert cm.report().passes[-1].result.stats["kv_appended"] == spec.num_layers
    for node in groups:
        roles = list(node.attributes["roles"].as_strings())
        assert {"x", "x2", "k_cache", "v_cache", "positions", "v"} <= set(roles)
        outs = list(node.attributes["output_roles"].as_strings())
        by_role = dict(zip(outs, node.outputs, strict=True))
        layer = _input(node, "k_cache").name.split(".")[1]
        assert by_role["k_cache"].name == f"present.{layer}.key"
        assert by_role["v_cache"].name == f"present.{layer}.value"
        assert _input(node, "v_cache").name == f"past.{layer}.value"
    for position, seq in ((0, 5), (7, 1)):
        feeds = _decode_feeds(spec, position, seq)
        for got, want in zip(cm._backend.run(feeds), plain._backend.run(feeds), strict=True):
            assert torch.equal(got, want)
    kept = compile_for_gpu(graph, PLAIN + ",fuse-rotary{append-kv=false}")
    assert len([n for n in kept.ir.graph if n.op_type == "ScatterND"]) == 2 * spec.num_layers


def test_kv_append_on_triton_writes_the_donated_caches_in_place(cache_graph):
    """The Triton binder's launch: the graph's values without donating (fed caches untouched),
    and with donation the updated caches are the fed tensors themselves."""
    pytest.importorskip("triton")
    graph, spec = cache_graph
    cm = compile_for_gpu(graph, PAIRED, backend="triton", device=DEVICE)
    plain = compile_for_gpu(graph, PLAIN)
    assert "rotary" in cm._backend.summary() and not cm._backend.fallbacks
    feeds = {k: v.to(DEVICE) for k, v in _decode_feeds(spec, 9).items()}
    kept = {k: v.clone() for k, v in feeds.items()}
    want = plain._backend.run({k: v.cpu() for k, v in feeds.items()})
    got = cm._backend.run(feeds)
    assert all(torch.equal(feeds[k], kept[k]) for k in feeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)
    donated = cm._backend.run(feeds, donate=True)
    where = {name: i for i, name in enumerate(spec.output_names)}
    for past, present in zip(spec.past, spec.present, strict=True):
        assert donated[where[present]].data_ptr() == feeds[past].data_ptr()
        torch.testing.assert_close(feeds[past].cpu(), want[where[present]], rtol=1e-5, atol=1e-5)


def test_kv_append_needs_the_v_write_of_the_same_layer(cache_graph):
    """Without module paths to tell the layers' v writes apart, nothing is taken in."""
    graph, spec = cache_graph
    bare = ir.from_proto(ir.to_proto(graph))
    for node in bare.graph:
        node.metadata_props.clear()
    cm = compile_for_gpu(bare, PAIRED)
    assert len([n for n in cm.ir.graph if n.op_type == "ScatterND"]) == 2 * spec.num_layers
    assert len(_groups(cm.ir)) == spec.num_layers  # still paired
