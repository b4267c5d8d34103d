"""Imports every built-in pass module so their @register_pass decorators run."""

from kompakt.passes.cleanup import (  # noqa: F401
    canonicalize,
    eliminate_common_subexpressions,
    fold_constants,
    gemm_to_matmul,
    infer_shapes,
    remove_dead_code,
)
from kompakt.passes.fuse import (  # noqa: F401
    fuse_attention,
    fuse_dequant_matmul,
    fuse_elementwise,
    fuse_glu,
    fuse_norm,
    fuse_quantized_matmul,
    fuse_rotary,
    merge_projections,
)
from kompakt.passes.lower import lower_to_matmulnbits  # noqa: F401
from kompakt.passes.quantize import (  # noqa: F401
    awq,
    codebook,
    fp8,
    gptq,
    lowrank_compensation,
    mixed_precision,
    outlier_split,
    quantize_activations,
    quantize_weights,
    smoothquant,
)
