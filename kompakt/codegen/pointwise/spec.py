"""Launch configuration, ahead-of-time variants and cost of pointwise kernels. No triton import."""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant
from kompakt.codegen.pointwise.chain import Chain, Operand, Step

_POINTER = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass(frozen=True)
class Config:
    """How a pointwise kernel is launched.

    Attributes:
        BLOCK: Elements per program (a power of two: ``tl.arange`` needs one).
        num_warps: Warps per program; BLOCK / (32 * num_warps) elements per thread.
        num_stages: 1: the kernel has no loop to pipeline.
    """

    BLOCK: int = 1024
    num_warps: int = 4
    num_stages: int = 1


# Above this many elements the grid is many waves deep on every GPU kompakt targets (H100: 132
# SMs x 2048 threads x 8 elements ~ 2M), so programs grow to 8 warps: half as many programs to
# schedule, each thread still moving 8 elements.
_LARGE = 1 << 22
_SMALL = 1024  # one program covers the tensor: the launch's latency dominates, not bandwidth


def choose_config(numel: int, arch: str = "sm_90") -> Config:
    """The launch heuristic by size regime. The kernel is bandwidth-bound, so the goal is wide
    (16-byte) accesses and enough programs to fill every SM; sm_80 and sm_90 both move at most
    16 bytes per thread per access, so the arch does not change the choice.

    8 elements per thread everywhere but tiny tensors: one 16-byte vector per fp16 operand (two
    for fp32). 16 per thread was measured by ptxas at 64-123 registers (tail path included)
    against 32-64 for 8, for no more bytes per access: occupancy would halve.
    """
    del arch
    if numel <= _SMALL:
        # One program, and fewer than 4 warps when there are too few elements for 8 each.
        block = max(128, 1 << max(numel - 1, 0).bit_length())
        return Config(BLOCK=block, num_warps=max(1, min(4, block // 256)))
    if numel < _LARGE:
        return Config(BLOCK=1024, num_warps=4)
    return Config(BLOCK=2048, num_warps=8)


def cost(
    numel: int, n_inputs: int, n_outputs: int, *, steps: int = 1, elem_bytes: int = 2
) -> tuple[int, int]:
    """``(flops, bytes_moved)`` of one launch: one flop per element per step; every input
    counted as 'full' (row and scalar operands are read from cache, an upper bound)."""
    return numel * max(steps, 1), numel * elem_bytes * (n_inputs + n_outputs)


def aot_chains() -> list[tuple[str, Chain, str]]:
    """Representative chains: (label, chain, input dtype)."""
    bias_gelu = Chain(
        inputs=(Operand("full"), Operand("row")),
        steps=(Step("Add", (0, 1)), Step("Gelu", (2,), {"approximate": "tanh"})),
        outputs=(3,),
    )
    swiglu = Chain(  # x * sigmoid(x) * up: the SwiGLU gate of LLaMA-style MLPs
        inputs=(Operand("full"), Operand("full")),
        steps=(Step("Sigmoid", (0,)), Step("Mul", (0, 2)), Step("Mul", (3, 1))),
        outputs=(4,),
    )
    scaled = Chain(  # fp32 residual + scale * |y|**p, clipped, then cast to fp16
        inputs=(Operand("full"), Operand("full"), Operand("scalar"), Operand("scalar")),
        steps=(
            Step("Abs", (1,)),
            Step("Pow", (4, 3)),
            Step("Mul", (5, 2)),
            Step("Add", (0, 6)),
            Step("Clip", (7,), {"min": -6.0, "max": 6.0}),
            Step("Cast", (8,), {"to": "fp16"}),
        ),
        outputs=(9,),
    )
    return [
        ("bias_gelu", bias_gelu, "fp16"),
        ("swiglu", swiglu, "fp16"),
        ("scaled", scaled, "fp32"),
    ]


def aot_variants(arch: str) -> list[Variant]:
    """The `aot_chains` rendered, written to the kernel cache and named so that aot.py's
    subprocess imports them through ``kompakt.codegen.pointwise.cache``'s module ``__getattr__``
    (it inherits ``KOMPAKT_CACHE_DIR``). Config: the large-tensor regime, the one that matters
    for bandwidth."""
    from kompakt.codegen.pointwise.cache import module_stem, write_source
    from kompakt.codegen.pointwise.render import render

    config = choose_config(_LARGE, arch)
    variants = []
    for _, chain, dtype_in in aot_chains():
        outs = chain.out_dtypes(dtype_in)
        source = render(chain, dtype_in, outs)
        write_source(source)
        signature = {f"in{i}": _POINTER[dtype_in] for i in range(len(chain.inputs))}
        signature |= {f"out{k}": _POINTER[d] for k, d in enumerate(outs)}
        signature["N"] = "i32"
        ints = {"N": _LARGE}
        if any(o.role == "row" for o in chain.inputs):
            signature["D"] = "i32"
            ints["D"] = 4096  # a hidden size: rows of the bias-like operand
        variants.append(
            Variant(
                kernel=f"kompakt.codegen.pointwise.cache:{module_stem(source)}",
                signature=signature,
                constants={"BLOCK": config.BLOCK},
                arch=arch,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                int_args=ints,
            )
        )
    return variants
