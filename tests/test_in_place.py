"""KV caches updated in place when the caller donates its feeds (kompakt.runtime.in_place)."""

from __future__ import annotations

import warnings

import onnx_ir as ir
import pytest
import torch
from conftest import tokens

import kompakt
from kompakt.errors import KompaktError
from kompakt.lowering.kv_cache import capture_with_cache
from kompakt.runtime.in_place import donatable_updates
from kompakt.runtime.plan import ExecutionPlan


@pytest.fixture(scope="module")
def decode_graph(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_with_cache(tiny("llama"), batch=1, max_length=16)


def _feeds(spec, position: int) -> dict[str, torch.Tensor]:
    caches = {name: torch.randn(c.shape) for name, c in spec.empty_caches(1).items()}
    return {"input_ids": tokens((1, 1)), "cache_position": torch.tensor([position]), **caches}


def test_every_cache_update_can_write_into_its_input(decode_graph):
    graph, spec = decode_graph
    assert len(donatable_updates(graph.graph)) == 2 * spec.num_layers
    assert ExecutionPlan(graph).donatable == tuple(sorted(spec.past))


def test_a_donating_run_writes_the_caches_in_place_and_computes_the_same(decode_graph):
    graph, spec = decode_graph
    plan = ExecutionPlan(graph)
    feeds = _feeds(spec, 6)
    kept = {k: v.clone() for k, v in feeds.items()}
    want = plan.run(feeds)
    assert all(torch.equal(feeds[k], kept[k]) for k in feeds), "a plain run changed its feeds"
    got = plan.run(feeds, donate=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    where = {name: i for i, name in enumerate(spec.output_names)}
    for past, present in zip(spec.past, spec.present, strict=True):
        out = got[where[present]]
        assert out.data_ptr() == feeds[past].data_ptr() and out.stride() == feeds[past].stride()
        assert torch.equal(feeds[past], want[where[present]])  # the fed tensor holds the update


def test_generate_through_a_donating_backend_equals_hugging_face(tiny):
    model = tiny("llama")
    prompt = tokens((2, 4))
    cm = kompakt.compile(
        model, (prompt,), target="cpu", backend="reference", progress=False, kv_cache=16
    )
    seen = []
    plan_run = cm._backend.plan.run

    def spy(feeds, donate=False, **kwargs):
        seen.append(donate)
        return plan_run(feeds, donate=donate, **kwargs)

    cm._backend.plan.run = spy
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),  # token 0 is a real token here, not padding
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert torch.equal(cm.generate(prompt, max_new_tokens=5), want)
    assert seen == [True] * 5


def _scatter_graph(past_also_read: bool) -> ir.Model:
    past = ir.val("past", ir.DataType.FLOAT, [4, 3])
    idx = ir.val("idx", ir.DataType.INT64, [1, 1])
    new = ir.val("new", ir.DataType.FLOAT, [1, 3])
    t = ir.node("Transpose", [past], attributes={"perm": [1, 0]}, name="t")
    back = ir.node("Transpose", [t.outputs[0]], attributes={"perm": [1, 0]}, name="back")
    scatter = ir.node("ScatterND", [back.outputs[0], idx, new], name="scatter")
    scatter.outputs[0].name = "present"
    nodes, outputs = [t, back, scatter], [scatter.outputs[0]]
    if past_also_read:
        neg = ir.node("Neg", [past], name="neg")
        neg.outputs[0].name = "other"
        nodes.append(neg)
        outputs.append(neg.outputs[0])
    graph = ir.Graph([past, idx, new], outputs, nodes=nodes, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_an_input_anything_else_reads_is_never_overwritten():
    assert ExecutionPlan(_scatter_graph(False)).donatable == ("past",)
    plan = ExecutionPlan(_scatter_graph(True))
    assert plan.donatable == ()
    past = torch.arange(12.0).reshape(4, 3)
    feeds = {"past": past, "idx": torch.tensor([[2]]), "new": torch.full((1, 3), -1.0)}
    present, other = plan.run(feeds, donate=True)
    assert torch.equal(past, torch.arange(12.0).reshape(4, 3))
    assert present[2].tolist() == [-1.0, -1.0, -1.0] and torch.equal(other, -past)


def test_in_place_writes_take_indices_as_scatter_nd_does():
    """Negative indices count from the end; one past the end is an error, donated or not."""
    plan = ExecutionPlan(_scatter_graph(False))
    for index in (-1, 3):
        past = torch.zeros(4, 3)
        feeds = {"past": past, "idx": torch.tensor([[index]]), "new": torch.ones(1, 3)}
        (present,) = plan.run(feeds, donate=True)
        assert present.data_ptr() == past.data_ptr() and past[3].tolist() == [1.0, 1.0, 1.0]
        assert past[:3].abs().sum() == 0
    for donate in (False, True):
        feeds = {"past": torch.zeros(4, 3), "idx": torch.tensor([[4]]), "new": torch.ones(1, 3)}
        with pytest.raises(KompaktError, match="ScatterND"):
            plan.run(feeds, donate=donate)


def test_one_tensor_fed_for_several_caches_is_not_overwritten(decode_graph):
    """Donation needs each cache to be its own memory; a tensor fed for every cache (or a
    broadcast one) runs out of place, computing what separate caches give."""
    graph, spec = decode_graph
    plan = ExecutionPlan(graph)
    base = torch.randn(spec.empty_caches(1)[spec.past[0]].shape)
    ids = {"input_ids": tokens((1, 1)), "cache_position": torch.tensor([6])}
    want = plan.run({**ids, **{n: base.clone() for n in spec.past}})
    kept = base.clone()
    got = plan.run({**ids, **{n: base for n in spec.past}}, donate=True)
    assert torch.equal(base, kept)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    zero = torch.zeros(1, 1, 1, 1).expand(base.shape)  # stride 0: cannot be written in place
    plan.run(
        {**ids, **{n: zero if n == spec.past[0] else base.clone() for n in spec.past}}, donate=True
    )
