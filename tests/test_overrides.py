"""Per-layer overrides: compile(..., overrides={glob: recipe | None})."""

import pytest
import torch
from conftest import OTHER_SHAPE, tokens

import kompakt
from kompakt.errors import TargetError


def schemes(compiled):
    return {r["module"]: r["scheme"] for p in compiled.report().passes for r in p.result.records}


def test_overrides_give_matched_layers_their_own_recipe(captured):
    compiled = kompakt.compile(
        captured("llama"),
        target="cpu-w4-g32",
        overrides={"*.down_proj": "w8", "*.layers.0.*": None, "lm_head": "w8-pc"},
        backend="reference",
    )
    assert compiled.pipeline == (
        "canonicalize,quantize-weights{group-size=32,exclude=[*.down_proj,*.layers.0.*,lm_head]},"
        "quantize-weights{bits=8,group-size=-1,symmetric=true,keep-lm-head=false,"
        "only=[*.down_proj]},"
        "quantize-weights{bits=8,group-size=-1,symmetric=true,exclude=[*.down_proj,*.layers.0.*],"
        "keep-lm-head=false,only=[lm_head]}"
    )
    got = schemes(compiled)
    assert got["model.layers.1.mlp.down_proj"] == "int8 per-channel sym"
    assert got["model.layers.0.mlp.down_proj"] == "int8 per-channel sym"  # first glob wins
    assert got["lm_head"] == "int8 per-channel sym"
    assert got["model.layers.1.self_attn.q_proj"] == "int4 g32 asym"
    assert "model.layers.0.self_attn.q_proj" not in got  # kept in float
    assert torch.isfinite(compiled(tokens(OTHER_SHAPE))).all()


def test_override_with_an_algorithm_uses_calibration(captured):
    compiled = kompakt.compile(
        captured("llama"),
        target="cpu-w4-g32",
        overrides={"*.mlp.*": "w3-g32-gptq"},
        calibration=[(tokens((2, 8)),)],
        backend="reference",
    )
    got = schemes(compiled)
    assert got["model.layers.0.mlp.up_proj"] == "int3 g32 asym gptq"
    assert got["model.layers.0.self_attn.v_proj"] == "int4 g32 asym gptq"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"*.down_proj": "w5"}, "override '\\*.down_proj': recipe 'w5'"),
        ({"*.down_proj": 8}, "a recipe is a string"),
        (["*.down_proj"], "overrides must be a dict"),
    ],
)
def test_bad_overrides_name_the_entry(captured, overrides, message):
    with pytest.raises(TargetError, match=message):
        kompakt.compile(captured("llama"), target="cpu-w4", overrides=overrides)


def test_overrides_need_a_weight_pass(captured):
    with pytest.raises(TargetError, match="need a weight-quantization pass"):
        kompakt.compile(captured("llama"), target="cpu", overrides={"lm_head": "w8"})
