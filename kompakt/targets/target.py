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

        Args:
            calibrated: Calibration data is available. Weight bits without an algorithm token
                then use GPTQ, the most accurate in kompakt's accuracy harness
                (benchmarks/RESULTS.md); without data, round-to-nearest.

        Raises:
            TargetError: The recipe asks for something this build has no pass for.
        """
        r = self.recipe
        parts = [CANONICAL_PREFIX]
        unsupported = []
        if r.activation_bits or r.fp8 or r.nvfp4:
            unsupported.append("activation quantization (w8a8/w4a8/fp8/nvfp4)")
        if r.sparsity or r.structured_sparsity:
            unsupported.append("pruning (sN:M/spNN)")
        if r.lowrank:
            unsupported.append("low-rank factorization (lrX)")
        if r.auto:
            unsupported.append("automatic per-layer selection (auto)")
        algorithm = r.algorithm or ("gptq" if calibrated else "rtn")
        pass_name = "quantize-weights" if algorithm == "rtn" else algorithm
        if r.weight_bits and pass_name not in all_passes():
            unsupported.append(f"the '{algorithm}' algorithm")
        if unsupported:
            raise TargetError(
                f"target '{self.text}' asks for {' and '.join(unsupported)}, which this build of "
                "kompakt does not implement yet; available now: weight-only round-to-nearest "
                "(w2/w3/w4/w8 with g<N>, pc, sym/asym)"
            )
        if r.weight_bits:
            options = [f"bits={r.weight_bits}"]
            group, symmetric = r.effective_group_size(), r.effective_symmetric()
            options.append(f"group-size={group}")
            options.append(f"symmetric={'true' if symmetric else 'false'}")
            parts.append(f"{pass_name}{{{','.join(options)}}}")
        return Pipeline.parse(",".join(parts))
