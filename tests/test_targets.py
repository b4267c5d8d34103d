"""Target strings: grammar, presets, aliases, errors, and the pipelines they stand for."""

import pytest

from kompakt import Target, TargetError
from kompakt.targets.hardware import PRESETS


def test_presets_cover_the_devices_users_name():
    assert {"a100", "h100", "h200", "l4", "rtx4090", "cpu"} <= set(PRESETS)
    for spec in PRESETS.values():
        assert spec.memory_bandwidth > 0 and spec.peak_flops["fp32"] > 0
        assert spec.source, f"{spec.name} has no source for its numbers"


def test_parse_device_and_tokens():
    t = Target.parse("a100-w4-g64-sym")
    assert t.device.name == "a100"
    assert (t.recipe.weight_bits, t.recipe.group_size, t.recipe.symmetric) == (4, 64, True)
    assert str(t) == "a100-w4-g64-sym"


def test_defaults_per_bits():
    w4, w8 = Target.parse("cpu-w4").recipe, Target.parse("cpu-w8").recipe
    assert (w4.effective_group_size(), w4.effective_symmetric()) == (128, False)
    assert (w8.effective_group_size(), w8.effective_symmetric()) == (-1, True)


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("a100-W4A16", (4, None)),
        ("a100-W8A16", (8, None)),
        ("a100-W8A8", (8, 8)),
        ("h100-w4a8", (4, 8)),
    ],
)
def test_llm_compressor_scheme_names(alias, expected):
    r = Target.parse(alias).recipe
    assert (r.weight_bits, r.activation_bits) == expected


def test_fp8_dynamic_alias():
    r = Target.parse("h100-FP8_DYNAMIC").recipe
    assert r.fp8 and r.dynamic


def test_sparsity_and_lowrank_tokens():
    r = Target.parse("a100-w4-s2:4-lr0.3").recipe
    assert r.structured_sparsity == (2, 4) and r.lowrank == 0.3
    assert Target.parse("cpu-sp50").recipe.sparsity == 0.5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a10-w4", "did you mean 'a100'"),
        ("cpu-w5", "unknown token 'w5'"),
        ("cpu-w4-w8", "conflicts"),
        ("cpu-w4-g100", "power of two"),
        ("cpu-g64", "without weight bits"),
        ("a100-fp8", "no fp8"),
        ("", "a target is a string"),
        ("cpu-s4:2", "0 < N < M"),
    ],
)
def test_bad_targets_say_what_is_wrong(text, fragment):
    with pytest.raises(TargetError, match=fragment):
        Target.parse(text)


def test_unknown_token_lists_valid_tokens():
    with pytest.raises(TargetError) as err:
        Target.parse("cpu-int4")
    assert "w2 / w3 / w4 / w8" in str(err.value) and "valid tokens" in str(err.value)


def test_default_pipelines():
    assert str(Target.parse("cpu").default_pipeline()) == "canonicalize"
    assert (
        str(Target.parse("cpu-w4").default_pipeline())
        == "canonicalize,quantize-weights{bits=4,group-size=128,symmetric=false}"
    )
    assert (
        str(Target.parse("a100-w8-g64").default_pipeline())
        == "canonicalize,quantize-weights{bits=8,group-size=64,symmetric=true},infer-shapes,merge-projections,fuse-dequant-matmul,fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise"
    )


@pytest.mark.parametrize("text", ["cpu-sp50", "a100-w4-lr0.3", "a100-auto"])
def test_recipes_without_a_pass_yet_fail_plainly(text):
    with pytest.raises(TargetError, match="does not implement yet"):
        Target.parse(text).default_pipeline()


def test_algorithm_tokens_choose_the_pass():
    assert str(Target.parse("a100-w4-gptq").default_pipeline()) == (
        "canonicalize,gptq{bits=4,group-size=128,symmetric=false},infer-shapes,merge-projections,fuse-dequant-matmul,fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise"
    )
    assert str(Target.parse("cpu-w3-g64-sym-awq").default_pipeline()) == (
        "canonicalize,awq{bits=3,group-size=64,symmetric=true}"
    )
    assert ",gptq{" in str(Target.parse("cpu-w4").default_pipeline(calibrated=True))
    assert ",quantize-weights{" in str(Target.parse("cpu-w4-rtn").default_pipeline(calibrated=True))


@pytest.mark.parametrize(
    ("text", "pipeline"),
    [
        (
            "a100-w8a8",
            "canonicalize,smoothquant,gptq{bits=8,group-size=-1,symmetric=true},"
            "quantize-activations{bits=8,dynamic=true},infer-shapes,fuse-quantized-matmul,"
            "fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise",
        ),
        (
            "cpu-W8A8-static-rtn",
            "canonicalize,smoothquant{alpha=0.8},quantize-weights{bits=8,group-size=-1,symmetric=true},"
            "quantize-activations{bits=8,dynamic=false}",
        ),
        (
            "a100-w4a8",
            "canonicalize,smoothquant,gptq{bits=4,group-size=128,symmetric=false},"
            "quantize-activations{bits=8,dynamic=true},infer-shapes,fuse-norm,fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise",
        ),
        (
            "h100-fp8",
            "canonicalize,fp8,infer-shapes,fuse-quantized-matmul,fuse-norm,fuse-rotary,"
            "fuse-attention,fuse-glu,fuse-elementwise",
        ),
        (
            "h100-FP8_DYNAMIC",
            "canonicalize,fp8{dynamic=true},infer-shapes,fuse-quantized-matmul,fuse-norm,"
            "fuse-rotary,fuse-attention,fuse-glu,fuse-elementwise",
        ),
        ("cpu-w3-codebook", "canonicalize,codebook{bits=3}"),
        (
            "cpu-w3-spqr",
            "canonicalize,outlier-split{kind=weight,bits=3,group-size=16,symmetric=false}",
        ),
        (
            "cpu-w3-lorc",
            "canonicalize,keep-float-weights,gptq{bits=3,group-size=128,symmetric=false},"
            "lowrank-compensation",
        ),
    ],
)
def test_recipes_for_each_scheme(text, pipeline):
    assert str(Target.parse(text).default_pipeline(calibrated=True)) == pipeline


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("h100-fp8-w4", "fp8 sets the weights' format"),
        ("cpu-w3-g64-codebook", "no groups"),
        ("cpu-lorc", "add w4 or w3"),
    ],
)
def test_scheme_conflicts_are_named(text, fragment):
    with pytest.raises(TargetError, match=fragment):
        Target.parse(text).default_pipeline(calibrated=True)
