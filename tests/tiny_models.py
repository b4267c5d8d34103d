"""Tiny random-init Hugging Face models, one per architecture family the suite covers.

Small enough to capture in a few seconds; hidden sizes are multiples of 16 so group-wise
quantization has real groups (group 16/32) as well as the default 128 falling back to one group.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
import transformers as hf
from onnx import TensorProto, helper, numpy_helper

VOCAB = 96


def _llama():
    return hf.LlamaForCausalLM(
        hf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


def _gpt2():
    return hf.GPT2LMHeadModel(
        hf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    )


def _qwen2():
    return hf.Qwen2ForCausalLM(
        hf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


def _opt():
    return hf.OPTForCausalLM(
        hf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    )


def _bert():
    return hf.BertModel(
        hf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    )


FACTORIES = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2, "opt": _opt, "bert": _bert}
CAUSAL = ("llama", "gpt2", "qwen2", "opt")


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FACTORIES[name]().eval()


def reference_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the captured graph's first output must equal: logits, or BERT's last hidden state."""
    with torch.no_grad():
        if isinstance(model, hf.BertModel):
            return model(input_ids=ids).last_hidden_state
        return model(input_ids=ids, use_cache=False).logits


def linear_model(weight: torch.Tensor) -> ir.Model:
    """One Linear layer as an ONNX model: x [m, K] -> MatMul(fc.weight) -> y; the node carries a module path like torch's."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight.numpy(), "fc.weight")],
    )
    from kompakt.lowering import load_onnx

    return load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
