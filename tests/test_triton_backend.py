"""The triton backend end to end: fused groups as Triton kernels (interpreter on CPU) vs reference."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import first_output

import kompakt
from kompakt.errors import CodegenError, KompaktError
from kompakt.runtime import triton_backend
from kompakt.runtime.triton_backend import triton_available

pytest.importorskip("triton")

FUSED = "canonicalize,infer-shapes,quantize-weights{bits=4,group-size=16},fuse-dequant-matmul"


def _pair(captured, name, pipeline=FUSED):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(target="a100-w4", pipeline=pipeline, progress=False, device=device)
    triton = kompakt.compile(captured(name), backend="triton", **common)
    reference = kompakt.compile(captured(name), backend="reference", **common)
    return triton, reference


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_tiny_model_on_triton_matches_reference(captured, name):
    triton, reference = _pair(captured, name)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        got, want = first_output(triton(ids)), first_output(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
    summary = triton._backend.summary()
    expected = 14 if name == "llama" else 13  # BERT: 6 per layer and the pooler
    assert f"dequant_matmul x{expected}" in summary
    assert "through torch:" in summary and "Softmax" in summary  # unfused ops are listed
    assert f"triton backend:\n  {summary.splitlines()[0]}" in str(triton.report())


def test_groups_a_family_rejects_run_their_body_through_torch(captured, monkeypatch):
    def reject(node, device):
        raise CodegenError("group size 24 is not a multiple of 16")

    monkeypatch.setattr(triton_backend, "binder_for", lambda pattern: reject)
    triton, reference = _pair(captured, "llama")
    ids = tokens(EXAMPLE_SHAPE)
    torch.testing.assert_close(
        first_output(triton(ids)), first_output(reference(ids)), rtol=1e-5, atol=1e-6
    )
    summary = triton._backend.summary()
    assert "triton kernels: none" in summary
    assert "FusedKernel[dequant_matmul] x14" in summary
    assert "multiple of 16" in summary  # the reason is reported per node


def test_without_a_gpu_or_the_interpreter_the_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_available(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_unknown_backend_lists_triton(captured):
    with pytest.raises(KompaktError, match="triton"):
        kompakt.compile(captured("llama"), target="a100", backend="tensorrt", progress=False)


def test_profile_puts_predicted_and_measured_time_per_kernel_in_the_report(captured):
    triton, _ = _pair(captured, "llama")
    text = triton.profile(tokens(EXAMPLE_SHAPE), repeats=1)
    assert text.startswith("predicted vs measured per kernel")
    rows = triton.report().kernel_times
    assert len(rows) == len(triton._backend.plan.steps)  # one row per launched step
    fused = [r for r in rows if r.op == "FusedKernel[dequant_matmul]"]
    assert len(fused) == 14
    assert all(r.predicted > 0 and r.measured > 0 for r in fused)
    assert {r.module for r in fused} >= {"model.layers.0.mlp.down_proj"}
    assert "predicted vs measured per kernel" in str(triton.report())


def test_profile_needs_a_backend_with_steps(captured):
    cm = kompakt.compile(captured("llama"), target="cpu-w4", progress=False)
    with pytest.raises(KompaktError, match="reference or triton backend"):
        cm.profile(tokens(EXAMPLE_SHAPE))


def test_gpu_target_default_pipeline_end_to_end(tiny):
    """What a user gets from target="a100-w4": every fusion runs as a Triton kernel."""
    model = tiny("llama")
    ids = tokens(EXAMPLE_SHAPE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(target="a100-w4", progress=False, device=device)
    triton = kompakt.compile(model, (ids,), backend="triton", **common)
    reference = kompakt.compile(model, (ids,), backend="reference", **common)
    assert triton.pipeline.endswith(
        "merge-projections,fuse-dequant-matmul,fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise"
    )
    summary = triton._backend.summary()
    # per layer: q/k/v as one GEMM, o, gate/up as one with silu(gate) * up in its epilogue,
    # down; q and k rotated in one launch
    for family in ("attention x2", "dequant_matmul x8", "norm x5", "rotary x2"):
        assert family in summary
    assert "glu x" not in summary
    assert "fell back" not in summary and "Sigmoid" not in summary
    got, want = first_output(triton(ids)), first_output(reference(ids))
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)


def test_generate_on_the_triton_backend(tiny):
    model = tiny("llama")
    prompt = tokens((2, 5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(target="a100", progress=False, device=device, kv_cache=16)
    triton = kompakt.compile(model, (prompt,), backend="triton", **common)
    assert "attention x2" in triton._backend.summary()
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(triton.generate(prompt, max_new_tokens=5).cpu(), want)


@pytest.mark.parametrize("target", ["a100-w8a8", "h100-fp8"])
def test_w8a8_and_fp8_targets_run_integer_and_fp8_gemms(tiny, target):
    model = tiny("llama")
    ids = tokens(EXAMPLE_SHAPE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(target=target, progress=False, device=device, calibration=[(ids,)])
    triton = kompakt.compile(model, (ids,), backend="triton", **common)
    reference = kompakt.compile(model, (ids,), backend="reference", **common)
    summary = triton._backend.summary()
    assert "scaled_matmul x14" in summary and "fell back" not in summary
    got, want = first_output(triton(ids)), first_output(reference(ids))
    # int8 codes are exact; the kernels' scale products round differently from the graph's
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=2e-4)


def test_unpacked_weights_are_freed_and_a_refused_call_runs_the_body(captured, monkeypatch):
    """The plan keeps no unpacked copy of a packed weight; when a bound kernel refuses a call at
    run time, the node's body runs instead (its freed constants loaded again) and the summary
    says so."""
    from kompakt.codegen.dequant_matmul import bind as bind_module

    triton, reference = _pair(captured, "llama")
    plan = triton._backend.plan
    quantized = [n for n in triton.ir.graph.initializers if n.endswith("weight_quantized")]
    assert len(quantized) == 14
    # q, scale and zero point of each of the 14 layers are read only by their kernel's packing
    assert len(plan._constants) <= len(triton.ir.graph.initializers) - 3 * 14

    ids = tokens(EXAMPLE_SHAPE)
    want = first_output(reference(ids))
    fresh, _ = _pair(captured, "llama")

    def refuse(*args, **kwargs):
        raise CodegenError("refused for the test")

    monkeypatch.setattr(bind_module, "launch_choice", refuse)
    torch.testing.assert_close(first_output(fresh(ids)), want, rtol=1e-5, atol=1e-6)
    summary = fresh._backend.summary()
    assert "at run time: refused for the test" in summary
    assert "FusedKernel[dequant_matmul] x14" in summary


@pytest.mark.gpu
def test_decode_steps_replay_a_cuda_graph(tiny):
    """On a GPU, decode steps (one shape, met again and again) are captured once and replayed;
    the tokens stay Hugging Face's. The CPU side of this (no host reads in a steady-state decode
    step) is checked in test_host_values.py."""
    model = tiny("llama")
    prompt = tokens((1, 5))
    cm = kompakt.compile(model, (prompt,), target="a100", progress=False, kv_cache=16)
    assert cm.backend == "triton"
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cm.generate(prompt.cuda(), max_new_tokens=6).cpu(), want)
    summary = cm._backend.summary()
    assert "CUDA graph captured" in summary, summary
    assert len(cm._backend._graphs) == 1
    # a donating replay hands back the graph's own caches, updated in place, not copies
    from kompakt.lowering.kv_cache import cache_spec_of

    spec = cache_spec_of(cm.ir)
    (captured,) = cm._backend._graphs.values()
    feeds = {name: captured.inputs[name] for name in spec.past}
    feeds.update(input_ids=prompt[:, :1].cuda(), cache_position=torch.tensor([7], device="cuda"))
    outputs = cm._backend.run(feeds, donate=True)
    where = {name: i for i, name in enumerate(spec.output_names)}
    for past, present in zip(spec.past, spec.present, strict=True):
        assert outputs[where[present]].data_ptr() == captured.inputs[past].data_ptr()


def test_triton_failures_fall_back_but_other_errors_propagate(captured, monkeypatch):
    from triton.runtime.errors import OutOfResources

    from kompakt.codegen.dequant_matmul import bind as bind_module

    ids = tokens(EXAMPLE_SHAPE)

    def no_room(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(bind_module, "launch_choice", no_room)
    triton, reference = _pair(captured, "llama")
    torch.testing.assert_close(
        first_output(triton(ids)), first_output(reference(ids)), rtol=1e-5, atol=1e-6
    )
    assert "shared memory" in triton._backend.summary()

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a kernel limit")

    monkeypatch.setattr(bind_module, "launch_choice", bug)
    broken, _ = _pair(captured, "llama")
    with pytest.raises(KompaktError, match="a bug, not a kernel limit"):
        broken(ids)


def _eager_graph(run, pool):
    """`capture_cuda_graph` without a GPU: "capture" runs once, and each replay runs again from
    the static inputs and writes into the same output memory, as a CUDA graph replay does."""
    outputs = run()

    def replay():
        for out, new in zip(outputs, run(), strict=True):
            if out.data_ptr() != new.data_ptr():
                out.copy_(new)

    return outputs, replay


def test_decode_replays_one_graph_and_never_copies_a_fed_back_cache(tiny, monkeypatch):
    """The CUDA-graph logic, with the graph itself stood in for: decode steps are captured once
    and replayed; the caches a replay hands back are its static inputs, so feeding them back
    copies only the token and the position; the tokens stay Hugging Face's."""
    monkeypatch.setattr(triton_backend, "capture_cuda_graph", _eager_graph)
    same = []
    real_same_memory = triton_backend._same_memory
    monkeypatch.setattr(
        triton_backend, "_same_memory", lambda a, b: same.append(real_same_memory(a, b)) or same[-1]
    )
    model = tiny("llama")
    prompt = tokens((1, 5))
    cm = kompakt.compile(
        model, (prompt,), target="a100", backend="triton", device="cpu", kv_cache=16, progress=False
    )
    backend = cm._backend
    backend.cuda_graphs = True  # what a CUDA device turns on
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cm.generate(prompt, max_new_tokens=6), want)
    assert len(backend._graphs) == 1 and "CUDA graph captured" in backend.summary()
    feeds = 2 + 2 * 2  # input_ids, cache_position, k and v of 2 layers
    replays = [same[i : i + feeds] for i in range(0, len(same), feeds)]
    assert len(replays) == 3  # decode steps 3..5: steps 1 and 2 ran eagerly, 2 captured
    assert replays[0].count(True) == 0  # the first replay copies the eager caches in
    assert all(r.count(True) == 4 for r in replays[1:])  # then only ids and position are copied
    # a caller that does not donate gets copies, never the graph's own buffers
    (captured,) = backend._graphs.values()
    outputs = backend.run(dict(captured.inputs))
    assert all(o.data_ptr() != t.data_ptr() for o in outputs for t in captured.inputs.values())


def test_a_w4_decode_step_launches_eight_kernels_per_layer(tiny, monkeypatch):
    """What a decode step costs in launches, counted under the interpreter: per layer two norms,
    four GEMMs (split-K reduced in the same launch; the gate/up GEMM applies SwiGLU in its
    epilogue), one rotary that also writes k and v into the caches and one attention (its split
    merge in the same launch); no torch work that grows with the layers (no index_put_, no NaN
    fix-up, no second reduce, no separate glu)."""
    import collections

    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    from kompakt.lowering.kv_cache import cache_spec_of

    launches = collections.Counter()
    real = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return real(self, *args, **kwargs)

    class TorchOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            launches[f"torch:{func.overloadpacket}"] += 1
            return func(*args, **(kwargs or {}))

    from kompakt.codegen.attention import spec as attention_spec

    # The heuristic splits decode keys only from 256 a split; 16 here, so this small cache
    # decodes split-K as a long one does (the merge must happen in the same launch).
    monkeypatch.setattr(attention_spec, "MIN_KEYS_PER_SPLIT", 16)
    model = tiny("llama")
    layers = model.config.num_hidden_layers
    prompt = tokens((1, 5))
    cm = kompakt.compile(
        model, (prompt,), target="a100-w4", backend="triton", device="cpu", kv_cache=64,
        progress=False,
    )  # fmt: skip
    spec = cache_spec_of(cm.ir)
    feeds = {"input_ids": prompt[:, :1], "cache_position": torch.tensor([5])}
    feeds.update(spec.empty_caches(1))
    cm._backend.run(feeds, donate=True)  # the first run of a shape works out its host values
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    with TorchOps():
        cm._backend.run(feeds, donate=True)
    per_layer = {
        "dequant_matmul_kernel": 4, "rotary_kernel": 1,
        "flash_decode_split_kernel": 1,  # 4 key chunks, merged by the last one
    }  # fmt: skip
    for name, count in per_layer.items():
        assert launches[name] == count * layers, (name, launches)
    assert launches["norm_kernel"] == 2 * layers + 1  # and the final norm
    kernels = {k for k in launches if not k.startswith("torch:")}
    assert kernels == {*per_layer, "norm_kernel"}, kernels
    for op in ("index_put_", "isneginf", "masked_fill", "scatter"):
        assert not [k for k in launches if k.startswith(f"torch:aten.{op}")], launches
