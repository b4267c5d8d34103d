"""GLU kernels: gated linear units, the MLP core of Llama (SwiGLU) and Gemma / T5 v1.1 (GeGLU).

    out = act(gate) * up        act: "silu", "gelu" (erf) or "gelu_tanh" (tanh approximation)

gate and up are [..., F] (fp16 / bf16 / fp32, rows with unit column stride); the packed form
takes x [..., 2F] with gate = x[..., :F] and up = x[..., F:]. The math is fp32; out is a
contiguous [..., F] in the input's dtype. The launchers are
`kompakt.codegen.glu.kernel.launch_glu` and ``launch_glu_packed`` (importing that module needs
triton); this package itself does not import triton.
"""

from kompakt.codegen.glu.reference import KINDS, glu_packed_reference, glu_reference
from kompakt.codegen.glu.spec import Config, aot_variants, choose_config, cost

__all__ = [
    "KINDS",
    "Config",
    "aot_variants",
    "choose_config",
    "cost",
    "glu_packed_reference",
    "glu_reference",
]
