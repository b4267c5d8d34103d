"""Capturing nn.Modules: names, dynamic dims, module paths, and the errors users hit."""

import warnings

import onnx_ir as ir
import pytest
import torch
from conftest import EXAMPLE_SHAPE, tokens

from kompakt import CaptureError
from kompakt.ir import module_of
from kompakt.lowering import capture_module


def test_token_inputs_get_named_dynamic_dims(captured):
    model = captured("llama")
    (ids,) = model.graph.inputs
    assert ids.name == "input_ids"
    assert [str(d) for d in ids.shape] == ["batch", "sequence"]
    (logits,) = model.graph.outputs
    assert logits.name == "logits"
    assert str(logits.shape[0]) == "batch" and str(logits.shape[1]) == "sequence"


def test_opset_and_ir_version(captured):
    model = captured("gpt2")
    assert model.opset_imports[""] == 21
    assert model.ir_version == 10


def test_every_node_records_its_module(captured):
    model = captured("llama")
    modules = {module_of(n) for n in model.graph}
    assert "model.layers.1.mlp.down_proj" in modules
    assert "model.layers.0.self_attn.q_proj" in modules
    down = [n for n in model.graph if module_of(n) == "model.layers.1.mlp.down_proj"]
    assert [n.op_type for n in down] == ["MatMul"]
    # exporter internals (stack traces, fx nodes) are not carried along
    assert not any(k.startswith("pkg.torch") for n in model.graph for k in n.metadata_props)


def test_weights_are_named_after_their_layer(captured):
    names = set(captured("llama").graph.initializers)
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "lm_head.weight" in names


def test_bert_outputs_are_named_after_model_output_fields(captured):
    outputs = [v.name for v in captured("bert").graph.outputs]
    assert outputs == ["last_hidden_state", "pooler_output"]


def test_batch_of_one_example_still_gives_dynamic_dims(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture_module(tiny("llama"), (tokens((1, 1)),))
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "sequence"]


def test_static_capture_on_request(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture_module(tiny("bert"), (tokens(EXAMPLE_SHAPE),), dynamic_shapes=False)
    assert list(model.graph.inputs[0].shape) == list(EXAMPLE_SHAPE)


def test_custom_dim_labels(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture_module(
            tiny("bert"), (tokens(EXAMPLE_SHAPE),), dynamic_shapes={"input_ids": {1: "tokens"}}
        )
    dims = model.graph.inputs[0].shape
    assert dims[0] == EXAMPLE_SHAPE[0] and str(dims[1]) == "tokens"


def test_dict_inputs_and_fixed_arguments():
    class Scaled(torch.nn.Module):
        def forward(self, x, scale: float = 1.0):
            return x * scale

    model = capture_module(Scaled(), {"x": torch.ones(2, 3), "scale": 3.0})
    assert [v.name for v in model.graph.inputs] == ["x"]


def test_missing_example_inputs_is_a_clear_error(tiny):
    with pytest.raises(CaptureError, match="needs example_inputs"):
        capture_module(tiny("llama"), None)


def test_unknown_dynamic_input_name(tiny):
    with pytest.raises(CaptureError, match="not among the example inputs"):
        capture_module(tiny("bert"), (tokens(EXAMPLE_SHAPE),), dynamic_shapes={"ids": {0: "b"}})


def test_untraceable_model_gives_a_short_reason():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on data: torch.export refuses it
                return x
            return -x

    with pytest.raises(CaptureError, match="could not capture DataDependent") as err:
        capture_module(DataDependent(), (torch.ones(2),))
    assert len(str(err.value)) < 2000


def test_non_module_is_refused():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture_module(lambda x: x, (torch.ones(1),))


def test_value_types_are_known_for_inputs_and_outputs(captured):
    model = captured("qwen2")
    assert model.graph.inputs[0].dtype == ir.DataType.INT64
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT
