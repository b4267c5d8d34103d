"""Shape arithmetic on the host, once per input signature (kompakt.runtime.host_values).

A GPU cannot be simulated here, but what makes a run unfit for a CUDA graph can: every read of a
device tensor's values on the host (``.tolist()``, ``.item()``, ``int()``), and every tensor made
from Python data (an upload). `DeviceOnly` wraps the tensors that would live on the GPU and
fails on the first; `Uploads` counts the second.
"""

from __future__ import annotations

import warnings

import onnx_ir as ir
import pytest
import tiny_models
import torch
from conftest import tokens
from torch.utils._python_dispatch import TorchDispatchMode

from kompakt.lowering.kv_cache import capture_with_cache
from kompakt.runtime.host_values import analyse
from kompakt.runtime.plan import ExecutionPlan

HOST_READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy"}


class DeviceOnly(torch.Tensor):
    """A CPU tensor standing in for a GPU one: reading its values on the host is an error."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise AssertionError(f"host read of a device value: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


class Uploads(TorchDispatchMode):
    """Counts tensors made from Python data (on a GPU: host-to-device copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _on_device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(DeviceOnly)


def _steady_state_run(plan: ExecutionPlan, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Runs ``feeds`` once to record the host values, then again with every device-side tensor
    (feeds, constants, remembered uploads) as `DeviceOnly`; asserts nothing is uploaded."""
    plan.run(feeds)
    for s, tensor in plan._constants.items():
        if s not in plan.host_slots:
            plan._constants[s] = _on_device(tensor)
    for key, remembered in plan._host_results.items():
        plan._host_results[key] = [
            t if s in plan.host_slots else _on_device(t)
            for s, t in zip(plan._cached_slots, remembered, strict=True)
        ]
    uploads = Uploads()
    with uploads:
        outputs = plan.run({k: _on_device(v) for k, v in feeds.items()})
    assert uploads.count == 0, f"{uploads.count} tensors made from Python data per run"
    return [torch.Tensor(o) if isinstance(o, DeviceOnly) else o for o in outputs]


@pytest.fixture(scope="module")
def decode_graph(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, spec = capture_with_cache(tiny("llama"), batch=1, max_length=16)
    return graph, spec


def _decode_feeds(spec, position: int) -> dict[str, torch.Tensor]:
    caches = spec.empty_caches(1)
    for i, name in enumerate(spec.past):
        caches[name] = torch.randn_like(caches[name]) * (i + 1)
    return {"input_ids": tokens((1, 1)), "cache_position": torch.tensor([position]), **caches}


def test_a_decode_step_reads_nothing_on_the_host_once_its_shapes_are_known(decode_graph):
    graph, spec = decode_graph
    plan = ExecutionPlan(graph)
    assert plan.host_syncs == []
    assert sum(step.host for step in plan.steps) >= 10  # Shape -> Gather -> Concat -> Reshape...
    feeds = _decode_feeds(spec, 5)
    want = ExecutionPlan(graph).run(feeds)
    got = _steady_state_run(plan, feeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_remembered_host_values_follow_the_input_shapes(decode_graph):
    """Prefill and decode have different shapes; each signature gets its own host values, and a
    position that changes without the shapes changing is data, not a host value."""
    graph, spec = decode_graph
    plan, fresh = ExecutionPlan(graph), ExecutionPlan(graph)
    prefill = {
        **_decode_feeds(spec, 0),
        "input_ids": tokens((1, 4)),
        "cache_position": torch.arange(4),
    }
    for feeds in [prefill, _decode_feeds(spec, 4), _decode_feeds(spec, 9), prefill]:
        got = plan.run(feeds)
        want = ExecutionPlan(graph).run(feeds)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len(plan._host_results) == 2
    fresh.run(prefill)
    assert len(fresh._host_results) == 1
    kept = fresh.host_values_for(prefill)
    assert kept and all(
        a is b
        for a, b in zip(kept, fresh._host_results[next(iter(fresh._host_results))], strict=True)
    )
    assert fresh.host_values_for(_decode_feeds(spec, 4)) == []  # not run yet


def _model(nodes, inputs, outputs, initializers=()):
    graph = ir.Graph(
        inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 21}
    )
    return ir.Model(graph, ir_version=10)


def _reshape_to_shape_of(x_shape, target_from_data: bool):
    x = ir.val("x", ir.DataType.FLOAT, x_shape)
    t = ir.val("t", ir.DataType.INT64, [2])
    shape = ir.node("Shape", [t if target_from_data else x], name="shape")
    if target_from_data:
        target = t
        nodes = []
    else:
        flip = ir.node("Slice", [shape.outputs[0], *_consts(-1, -3, 0, -1)], name="flip")
        target = flip.outputs[0]
        nodes = [shape, flip]
    reshape = ir.node("Reshape", [x, target], name="reshape")
    reshape.outputs[0].name = "y"
    inputs = [x, t] if target_from_data else [x]
    return _model([*nodes, reshape], inputs, [reshape.outputs[0]], _CONSTS)


_CONSTS: list[ir.Value] = []


def _consts(*values):
    out = []
    for v in values:
        c = ir.Value(name=f"c{len(_CONSTS)}", const_value=ir.tensor([v], dtype=ir.DataType.INT64))
        _CONSTS.append(c)
        out.append(c)
    return out


def test_a_shape_read_from_data_is_reported_as_a_sync():
    _CONSTS.clear()
    plan = ExecutionPlan(_reshape_to_shape_of([2, 3], target_from_data=True))
    assert plan.host_syncs == [
        "op 'Reshape' at node 'reshape' reads input 1 ('t') on the host, and it is computed "
        "from data"
    ]
    (y,) = plan.run({"x": torch.arange(6.0).reshape(2, 3), "t": torch.tensor([3, 2])})
    assert y.shape == (3, 2)


def test_a_shape_from_shapes_is_computed_on_the_host_and_remembered():
    _CONSTS.clear()
    plan = ExecutionPlan(_reshape_to_shape_of([2, 3], target_from_data=False))
    assert plan.host_syncs == [] and [s.host for s in plan.steps] == [True, True, False]
    x = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(_steady_state_run(plan, {"x": x})[0], x.reshape(3, 2))
    # a new signature is computed afresh
    (y,) = plan.run({"x": torch.zeros(4, 5)})
    assert y.shape == (5, 4)


def test_data_dependent_shapes_are_not_host_values():
    """Shape(NonZero(x)) depends on x's values: it must not be remembered per signature."""
    x = ir.val("x", ir.DataType.FLOAT, [4])
    nz = ir.node("NonZero", [x], name="nz")
    shape = ir.node("Shape", [nz.outputs[0]], name="shape")
    shape.outputs[0].name = "s"
    model = _model([nz, shape], [x], [shape.outputs[0]])
    host = analyse(list(model.graph), model.graph.inputs, {})
    assert host.host_steps == set()
    assert host.syncs == ["op 'NonZero' at node 'nz' has a data-dependent output shape"]
    plan = ExecutionPlan(model)
    assert plan.run({"x": torch.tensor([1.0, 0, 2, 0])})[0].tolist() == [1, 2]
    assert plan.run({"x": torch.tensor([1.0, 3, 2, 0])})[0].tolist() == [1, 3]


def test_observers_and_clocks_still_see_every_step(decode_graph):
    graph, spec = decode_graph
    plan = ExecutionPlan(graph)
    feeds = _decode_feeds(spec, 2)
    plan.run(feeds)
    seen = []
    plan.run(feeds, observer=lambda node, ins, outs: seen.append(node.name))
    assert len(seen) == len(plan.steps)
    plan.run(feeds, clock=lambda: 0.0)
    assert len(plan.step_seconds) == len(plan.steps)


@pytest.mark.parametrize("family", [f for f in tiny_models.CAUSAL if f != "llama"])
def test_other_families_decode_without_host_syncs(tiny, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, spec = capture_with_cache(tiny(family), batch=1, max_length=16)
    plan = ExecutionPlan(graph)
    assert plan.host_syncs == []
    feeds = _decode_feeds(spec, 3)
    want = ExecutionPlan(graph).run(feeds)
    for g, w in zip(_steady_state_run(plan, feeds), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_fused_bodies_take_their_shape_inputs_from_the_host(tiny):
    """Fused attention/norm bodies (the reference backend runs them) compute shapes from their
    inputs; in a steady-state decode step they read nothing on the host either."""
    import kompakt

    model = tiny("llama")
    cm = kompakt.compile(
        model, (tokens((1, 5)),), target="a100", backend="reference", kv_cache=16, progress=False
    )
    assert any(n.domain == "kompakt" for n in cm.ir.graph)
    from kompakt.lowering.kv_cache import cache_spec_of

    spec = cache_spec_of(cm.ir)
    plan = cm._backend.plan
    feeds = _decode_feeds(spec, 5)
    want = ExecutionPlan(cm.ir).run(feeds)
    for g, w in zip(_steady_state_run(plan, feeds), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_fused_body_remembers_shape_values_by_value_not_only_by_shape():
    """A body input used only as a Reshape target is a host value of the body; the same shape
    with other values must not reuse what was remembered."""
    from kompakt.ir.fused import fuse_nodes

    x = ir.val("x", ir.DataType.FLOAT, [6])
    t = ir.val("t", ir.DataType.INT64, [2])
    target = ir.node("Identity", [t], name="target")  # shape arithmetic inside the body
    reshape = ir.node("Reshape", [x, target.outputs[0]], name="reshape")
    neg = ir.node("Neg", [reshape.outputs[0]], name="neg")
    neg.outputs[0].name = "y"
    model = _model([target, reshape, neg], [x, t], [neg.outputs[0]])
    fuse_nodes(model, [target, reshape, neg], "test")
    plan = ExecutionPlan(model)
    assert plan.host_syncs == [
        "op 'FusedKernel' at node 'fused_test' reads input 0 ('t') on the host, and it is "
        "computed from data"
    ]
    values = torch.arange(6.0)
    assert plan.run({"x": values, "t": torch.tensor([2, 3])})[0].shape == (2, 3)
    assert plan.run({"x": values, "t": torch.tensor([3, 2])})[0].shape == (3, 2)


def test_a_step_reading_data_on_the_host_keeps_all_its_inputs_on_the_device():
    """Range(0, n, 1) with n from data: 0 and 1 are small constants, but Range makes its output
    where its first input lives, so none of its inputs become CPU copies."""
    n = ir.val("n", ir.DataType.INT64, [])
    start, delta = _consts(0, 1)
    start.const_value, delta.const_value = (
        ir.tensor(0, ir.DataType.INT64),
        ir.tensor(1, ir.DataType.INT64),
    )
    rng = ir.node("Range", [start, n, delta], name="range")
    rng.outputs[0].name = "r"
    plan = ExecutionPlan(_model([rng], [n], [rng.outputs[0]], [start, delta]))
    assert len(plan.host_syncs) == 1
    (step,) = plan.steps
    assert not set(step.inputs) & plan.host_slots
    assert plan.run({"n": torch.tensor(4)})[0].tolist() == [0, 1, 2, 3]


def test_a_remembered_output_is_the_callers_own_copy():
    x = ir.val("x", ir.DataType.FLOAT, [None, 3])
    shape = ir.node("Shape", [x], name="shape")
    shape.outputs[0].name = "s"
    plan = ExecutionPlan(_model([shape], [x], [shape.outputs[0]]))
    first = plan.run({"x": torch.zeros(2, 3)})[0]
    first += 5  # the caller writes into what it got
    assert plan.run({"x": torch.zeros(2, 3)})[0].tolist() == [2, 3]
