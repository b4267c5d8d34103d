"""aot.py: variants are specialized as Triton's launcher specializes a real launch."""

from __future__ import annotations

import dataclasses

import pytest

from kompakt.codegen.aot import Built, Variant, _specialize, compile_variants
from kompakt.codegen.dequant_matmul.spec import aot_variants
from kompakt.errors import CodegenError

_SIG = {"x_ptr": "*fp16", "out_ptr": "*fp16", "M": "i32", "N": "i32", "stride": "i32"}


def test_int_args_specialize_like_the_launcher():
    variant = Variant("m:f", _SIG, {"BLOCK": 64}, int_args={"M": 1, "N": 4096, "stride": 4100})
    signature, constants, divisible = _specialize(variant)
    assert constants == {"BLOCK": 64, "M": 1}  # a value of 1 is compiled in
    assert "M" not in signature and signature["N"] == "i32"
    assert sorted(divisible) == ["N", "out_ptr", "x_ptr"]  # 4100 is not a multiple of 16
    unaligned = dataclasses.replace(variant, aligned=False)
    assert _specialize(unaligned)[2] == []


@pytest.mark.parametrize(
    ("int_args", "what"),
    [({"x_ptr": 16}, r"\*fp16"), ({"K": 16}, "absent"), ({"BLOCK": 16}, "a constant")],
)
def test_int_args_must_name_integer_arguments(int_args, what):
    variant = Variant("m:f", _SIG, {"BLOCK": 64}, int_args=int_args)
    with pytest.raises(CodegenError, match=f"m:f: int_args names '{next(iter(int_args))}'.*{what}"):
        _specialize(variant)


def test_widest_load_reads_vector_and_async_copies():
    ptx = (
        "ld.global.b16 { %rs1 }, [ %rd1 + 0 ];\n"
        "@%p1 ld.global.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];\n"
        "cp.async.cg.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x10, %r4;\n"
    )
    built = Built(Variant("m:f", _SIG), ptx, 1, 0, 0, 0)
    assert built.widest_load_bits == 128
    built = Built(Variant("m:f", _SIG), ptx.rsplit("cp.async", 1)[0], 1, 0, 0, 0)
    assert built.widest_load_bits == 64


def test_unspecialized_gemv_build_would_misreport_its_loads():
    """Why int_args exist: without the launch's sizes the M = 1 GEMV's packed weight rows have no
    known alignment, and the build shows 4-byte loads no real launch compiles."""
    gemv = aot_variants("sm_90")[0]
    assert gemv.int_args["M"] == 1
    bare = dataclasses.replace(gemv, int_args={})
    real, unspecialized = compile_variants([gemv, bare])
    print(real.summary(), "|", unspecialized.summary())
    assert real.widest_load_bits == 128 and unspecialized.widest_load_bits <= 32
