"""Calibration: input checking, text batches, the block-by-block runner and its statistics."""

import warnings

import onnx_ir as ir
import pytest
import torch
from conftest import tokens

import kompakt
from kompakt import CalibrationError
from kompakt.data import text_batches
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner, block_of
from kompakt.runtime.plan import ExecutionPlan


def feeds(count=3, batch=2):
    return [{"input_ids": tokens((batch, 5 + i), seed=i)} for i in range(count)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "opt"])
def test_blockwise_run_equals_the_plan(captured, name):
    model = captured(name)
    runner = BlockwiseRunner(model, feeds())
    keys = [stage.key for stage in runner.stages()]
    assert [k for k in keys if k] == sorted({k for k in keys if k})  # each block once, in order
    assert len([k for k in keys if k]) == 2  # the tiny models have two layers
    plan = ExecutionPlan(model)
    for feed, outputs in zip(feeds(), runner.outputs(), strict=True):
        torch.testing.assert_close(outputs[0], plan.run(feed)[0], rtol=0, atol=0)


def test_only_boundary_values_stay_alive(captured):
    runner = BlockwiseRunner(captured("llama"), feeds())
    live = []
    for _stage in runner.stages():
        live.append(len(runner.envs[0]))
    # between blocks only a few tensors cross (hidden states, mask, rotary tables), never the
    # hundreds of values a block computes
    assert max(live) < 12
    assert len(runner.envs[0]) == 1  # at the end: the graph output


def test_statistics_match_a_direct_computation(captured):
    model = captured("llama")
    batches = feeds()
    runner = BlockwiseRunner(model, batches)
    for stage in runner.stages():
        if stage.key == "model.layers.1":
            down = next(
                n
                for n in stage.nodes
                if n.metadata_props.get("kompakt.module", "").endswith("down_proj")
            )
            x = down.inputs[0]
            stats = stage.collect({id(x): {"hessian", "absmean", "absmax", "samples"}})[id(x)]
    seen = []
    for feed in batches:
        ExecutionPlan(model).run(
            feed, observer=lambda node, ins, outs: seen.append(ins[0]) if node is down else None
        )
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen])
    torch.testing.assert_close(stats.hessian, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.absmean, rows.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.absmax, rows.abs().amax(0))
    assert stats.samples.shape == rows.shape and stats.tokens == rows.shape[0]


def _scale_stage_weights(stage, factor):
    """Multiplies every float weight a MatMul of ``stage`` reads, in place (as passes do)."""
    from kompakt.ir.tensors import from_torch, to_torch

    for node in stage.nodes:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            weight = node.inputs[1]
            weight.const_value = from_torch(to_torch(weight.const_value) * factor, name=weight.name)


@pytest.mark.parametrize("forward_now", [False, True])
def test_the_next_stage_sees_the_weights_as_the_pass_left_them(captured, forward_now):
    """Weights rewritten in place are what the stage runs forward with (cached copies are
    dropped first), unless the pass ran the stage forward itself before a later rewrite."""
    model = captured("llama").clone()
    runner = BlockwiseRunner(model, feeds(count=1))
    for stage in runner.stages():
        if stage.key == "model.layers.0":
            stage.collect({})  # fills the runner's constant cache with the weights as they are
            _scale_stage_weights(stage, 2.0)
            if forward_now:
                stage.forward_now()  # next stage: outputs of the x2 weights
                _scale_stage_weights(stage, 0.0)  # a later rewrite it must not see
    out = runner.outputs()[0][0]
    expected = captured("llama").clone()
    for stage in BlockwiseRunner(expected, feeds(count=1)).stages():
        if stage.key == "model.layers.0":
            _scale_stage_weights(stage, 2.0)  # the model the next stage must have seen
    want = ExecutionPlan(expected).run(feeds(count=1)[0])[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_block_names():
    def node(module):
        n = ir.node("Relu", [ir.val("x", ir.DataType.FLOAT, [1])])
        n.metadata_props["kompakt.module"] = module
        return n

    assert block_of(node("model.layers.3.mlp.down_proj")) == "model.layers.3"
    assert block_of(node("encoder.layer.11.attention.self.query")) == "encoder.layer.11"
    assert block_of(node("transformer.h.0.attn.c_attn")) == "transformer.h.0"
    assert block_of(node("model.decoder.layers.2")) == "model.decoder.layers.2"
    assert block_of(node("model.embed_tokens")) is None
    assert block_of(node("lm_head")) is None


@pytest.mark.parametrize(
    ("batches", "fragment"),
    [
        (None, "needs calibration data"),
        ([], "empty calibration set"),
        ([{"input_idz": tokens((1, 4))}], r"input\(s\) \['input_idz'\]"),
        ([(tokens((1, 4)), tokens((1, 4)))], "has 2 tensors; the model takes 1"),
        (["some text"], "must be a dict, a tuple of tensors or a tensor"),
        ([{}], r"lacks input\(s\) \['input_ids'\]"),
    ],
)
def test_bad_calibration_is_named(captured, batches, fragment):
    with pytest.raises(CalibrationError, match=fragment):
        calibration_feeds(captured("llama"), batches, "gptq")


def test_nan_in_float_calibration_inputs_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    bad = torch.randn(2, 16)
    bad[1, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            kompakt.PassError, match="calibration batch 1, input 'input' contains NaN"
        ):
            kompakt.compile(
                model,
                (torch.randn(2, 16),),
                pipeline="canonicalize,gptq",
                calibration=[torch.randn(2, 16), bad],
            )


def test_missing_calibration_fails_before_capture(tiny):
    class Untraceable(torch.nn.Module):  # capture would fail: the error must come first
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CalibrationError, match="pass 'gptq' needs calibration data"):
        kompakt.compile(Untraceable(), (torch.ones(2),), target="cpu-w4-gptq")


def test_text_batches():
    from kompakt.models import load_minilm

    _, tokenizer = load_minilm()
    batches = text_batches(
        ["one", "two words", "three words here"], tokenizer, batch_size=2, max_length=4
    )
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert all(b["input_ids"].shape[1] <= 4 for b in batches)
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    assert set(text_batches(["x"], tokenizer, with_attention_mask=False)[0]) == {"input_ids"}
    with pytest.raises(kompakt.KompaktError, match="not one string"):
        text_batches("a string", tokenizer)
