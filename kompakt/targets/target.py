"""Target: a device plus a recipe, parsed from strings like ``"a100-w4"`` or ``"cpu-w8"``."""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.errors import TargetError
from kompakt.passes.pipeline import Pipeline
from kompakt.passes.registry import all_passes
from kompakt.targets.hardware import HardwareSpec, get_device
from kompakt.targets.recipe import Recipe, parse_recipe

CANONICAL_PREFIX = "canonicalize"


@dataclass(frozen=True)
class Target:
    """Where the model will run and what compression it asks for.

    Attributes:
        device: The hardware preset.
        recipe: The parsed recipe tokens.
        text: The target string as given.
    """

    device: HardwareSpec
    recipe: Recipe
    text: str

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """Parses ``<device>[-<token>...]``; raises `TargetError` naming what is valid."""
        if isinstance(text, Target):
            return text
        if not isinstance(text, str) or not text.strip():
            raise TargetError(f"a target is a string like 'cpu-w4' or 'a100-w4', got {text!r}")
        device_name, *tokens = text.strip().split("-")
        device = get_device(device_name.lower())
        recipe = parse_recipe(tokens, text)
        target = cls(device, recipe, text.strip())
        target._check_device_support()
        return target

    def _check_device_support(self) -> None:
        r, d = self.recipe, self.device
        if r.fp8 and not d.supports("fp8"):
            raise TargetError(
                f"target '{self.text}': {d.description} has no fp8 tensor cores; use w8a8 or w4"
            )
        if r.nvfp4 and (d.compute_capability or (0, 0)) < (10, 0):
            raise TargetError(f"target '{self.text}': NVFP4 needs a Blackwell GPU (sm_100+)")

    def __str__(self) -> str:
        return self.text

    def default_pipeline(self, calibrated: bool = False) -> Pipeline:
        """The pipeline this target's recipe stands for.

        - weight bits: the algorithm's pass (``gptq`` when calibration is given and no algorithm
          is named: the most accurate in kompakt's accuracy harness, benchmarks/RESULTS.md;
          round-to-nearest without data); ``w4.5``: mixed precision;
        - ``w8a8`` / ``w4a8``: SmoothQuant, the weights, then int8 activations, per token at run
          time unless ``static`` (as llm-compressor's W8A8 scheme); static per-tensor scales
          smooth with alpha 0.8 instead of 0.5 (see RESULTS.md);
        - ``fp8``: E4M3 weights and activations, static per-tensor activation scales unless
          ``dynamic``;
        - ``lorc``: a low-rank correction of the weights' quantization error after them;
        - GPU devices: fusion last (``fuse-dequant-matmul`` for weight-only schemes,
          ``fuse-quantized-matmul`` for W8A8 and fp8, then
          ``fuse-norm``, ``fuse-rotary`` and ``fuse-attention``), which the triton backend runs as one kernel per
          fused group.

        Raises:
            TargetError: The recipe asks for something this build has no pass for.
        """
        r = self.recipe
        unsupported = []
        if r.nvfp4:
            unsupported.append("NVFP4")
        if r.sparsity or r.structured_sparsity:
            unsupported.append("pruning (sN:M/spNN)")
        if r.lowrank:
            unsupported.append("low-rank factorization (lrX)")
        if r.auto:
            unsupported.append("automatic per-layer selection (auto)")
        if unsupported:
            raise TargetError(
                f"target '{self.text}' asks for {' and '.join(unsupported)}, which this build of "
                "kompakt does not implement yet; available now: weight quantization (w2-w8, "
                "w4.5, rtn/gptq/awq/codebook/spqr, lorc), w8a8, w4a8, fp8"
            )
        parts = [CANONICAL_PREFIX]
        if r.lorc:
            parts.append("keep-float-weights")
        if r.fp8:
            if r.weight_bits:
                raise TargetError(
                    f"target '{self.text}': fp8 sets the weights' format; drop w{r.weight_bits}"
                )
            parts.append("fp8{dynamic=true}" if r.dynamic else "fp8")
        elif r.activation_bits:
            # Static per-tensor scales need more of the activations' range moved into the
            # weights: on all-MiniLM-L6-v2 alpha 0.5 leaves the FFN down-projection's input
            # wider than before (its outlier channels meet outlier weight rows), 0.8 gives
            # cosine 0.99766; per-token scales do best at the paper's 0.5 (RESULTS.md).
            parts.append("smoothquant" if r.dynamic is not False else "smoothquant{alpha=0.8}")
            parts.append(self._weight_pass(calibrated))
            dynamic = "false" if r.dynamic is False else "true"
            parts.append(f"quantize-activations{{bits={r.activation_bits},dynamic={dynamic}}}")
        elif r.weight_bits:
            parts.append(self._weight_pass(calibrated))
        if r.lorc:
            if len(parts) == 2:
                raise TargetError(
                    f"target '{self.text}': lorc corrects quantized weights; add w4 or w3"
                )
            parts.append("lowrank-compensation")
        parts.extend(self._fusions())
        return Pipeline.parse(",".join(parts))

    def _fusions(self) -> list[str]:
        """GPU targets run fused groups as Triton kernels (the triton backend); CPU targets run
        on ONNX Runtime, which fuses by itself."""
        r = self.recipe
        if self.device.kind != "gpu":
            return []
        weight_only = (r.weight_bits or r.average_bits) and not (r.activation_bits or r.fp8)
        # infer-shapes first: the attention fusion proves broadcasts from the inferred shapes.
        # Decode is a few hundred small launches per token, so fewer launches is most of what
        # there is to win: q/k/v and gate/up become one GEMM each (merge-projections), and what
        # is left between kernels one kernel: SwiGLU's silu(gate) * up after the merge (fuse-glu
        # reads the Split halves in place), other elementwise chains (fuse-elementwise). The
        # cost model agrees (tiny Llama, a100-w4, M = 1: 312 -> 304 µs predicted).
        fusions = ["infer-shapes"]
        if weight_only:
            fusions += ["merge-projections", "fuse-dequant-matmul"]
        if r.fp8 or (r.activation_bits and r.weight_bits == 8):
            fusions.append("fuse-quantized-matmul")  # int8 x int8 / e4m3 GEMMs, scale epilogue
        return fusions + [
            *("fuse-norm", "fuse-rotary", "fuse-attention", "fuse-glu", "fuse-elementwise")
        ]

    def _weight_pass(self, calibrated: bool) -> str:
        r = self.recipe
        algorithm = r.algorithm or ("gptq" if calibrated else "rtn")
        if r.average_bits:
            return self._mixed_precision(algorithm)
        group, symmetric = r.effective_group_size(), r.effective_symmetric()
        sym = "true" if symmetric else "false"
        if algorithm == "codebook":
            if r.group_size is not None or r.symmetric is not None:
                raise TargetError(
                    f"target '{self.text}': codebook weights have no groups or symmetry; drop the "
                    "g<N>/pc/sym/asym token"
                )
            return f"codebook{{bits={r.weight_bits}}}"
        if algorithm == "spqr":
            group = r.group_size if r.group_size is not None else 16
            return f"outlier-split{{kind=weight,bits={r.weight_bits},group-size={group},symmetric={sym}}}"
        pass_name = "quantize-weights" if algorithm == "rtn" else algorithm
        if pass_name not in all_passes():
            raise TargetError(f"target '{self.text}': no pass for the '{algorithm}' algorithm")
        return f"{pass_name}{{bits={r.weight_bits},group-size={group},symmetric={sym}}}"

    def _mixed_precision(self, algorithm: str) -> str:
        """``w4.5``: 4 or 8 bits per layer (``w3.5``: 3 or 8), quantized with GPTQ (or RTN)."""
        r = self.recipe
        if algorithm not in ("gptq", "rtn"):
            raise TargetError(
                f"target '{self.text}': mixed precision quantizes with gptq or rtn, not {algorithm}"
            )
        symmetric = "true" if r.symmetric else "false"
        group = r.group_size if r.group_size is not None else 128
        narrow = max(b for b in (2, 3, 4) if b <= r.average_bits)
        widths = "" if narrow == 4 else f"candidates=[{narrow},8],"
        return (
            f"mixed-precision{{average-bits={r.average_bits},{widths}group-size={group},"
            f"symmetric={symmetric},method={algorithm}}}"
        )
