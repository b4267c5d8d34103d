"""Recipe tokens: what to do to the model, written after the device in a target string.

    a100-w4            4-bit weights, group 128 (the default group for 4 bits and below)
    cpu-w8             8-bit weights, one scale per output channel
    cpu-w4-g64-sym     4-bit, group 64, symmetric
    a100-w4-gptq       4-bit with GPTQ instead of round-to-nearest
    a100-w4.5          mixed precision: bits per layer by sensitivity, 4.5 bits on average
    a100-W4A16         llm-compressor's scheme names are accepted as aliases

Tokens are case-insensitive. A token this build can parse but has no pass for yet is reported
by `Target.default_pipeline`, not silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from kompakt.errors import TargetError, did_you_mean

ALGORITHMS = ("rtn", "gptq", "awq", "codebook", "spqr")

# llm-compressor scheme names -> our tokens.
SCHEME_ALIASES: dict[str, tuple[str, ...]] = {
    "w4a16": ("w4",),
    "w8a16": ("w8",),
    "w8a8": ("w8a8",),
    "w4a8": ("w4a8",),
    "fp8": ("fp8",),
    "fp8_dynamic": ("fp8", "dynamic"),
    "nvfp4": ("nvfp4",),
}

TOKEN_HELP: dict[str, str] = {
    "w2 / w3 / w4 / w8": "weight-only quantization to 2/3/4/8 bits",
    "w4.5 (any w<bits>.<fraction>)": "mixed precision: widths per layer averaging this many bits",
    "w4a8 / w8a8": "weights and activations quantized (int8 activations)",
    "fp8": "float8 E4M3 weights and activations",
    "nvfp4": "NVIDIA FP4 weights and activations",
    "g32 / g64 / g128 / g256": "quantization group size along K",
    "pc": "one scale per output channel (no groups)",
    "sym / asym": "symmetric (signed, no zero point) or asymmetric grid",
    "rtn / gptq / awq / codebook / spqr": "weight quantization algorithm (codebook: SqueezeLLM "
    "lookup tables; spqr: groups of 16 plus 1% float outlier weights)",
    "lorc": "add a low-rank correction of the quantization error (ZeroQuant-V2's LoRC)",
    "dynamic / static": "activation scales per token at run time (default for w8a8/w4a8) or per "
    "tensor from calibration (default for fp8)",
    "s2:4": "2:4 structured sparsity",
    "sp50": "unstructured sparsity, percent of weights zeroed",
    "lr0.3": "low-rank factorization keeping this fraction of rank",
    "auto": "let the cost model pick per layer under an accuracy budget",
    "W4A16 / W8A16 / W8A8 / FP8 / FP8_DYNAMIC / W4A8 / NVFP4": "llm-compressor scheme names",
}


@dataclass(frozen=True)
class Recipe:
    """The compression a target asks for. ``None`` means "not asked" (use the default)."""

    weight_bits: int | None = None
    average_bits: float | None = None
    activation_bits: int | None = None
    fp8: bool = False
    nvfp4: bool = False
    group_size: int | None = None
    symmetric: bool | None = None
    algorithm: str | None = None
    dynamic: bool | None = None
    lorc: bool = False
    sparsity: float | None = None
    structured_sparsity: tuple[int, int] | None = None
    lowrank: float | None = None
    auto: bool = False
    tokens: tuple[str, ...] = field(default=(), compare=False)

    @property
    def compresses(self) -> bool:
        return any(
            (
                self.weight_bits,
                self.fp8,
                self.nvfp4,
                self.sparsity,
                self.structured_sparsity,
                self.lowrank,
                self.auto,
            )
        )

    def effective_group_size(self) -> int:
        """The group size to use: asked for, else 128 at <= 4 bits and per-channel at 8."""
        if self.group_size is not None:
            return self.group_size
        return -1 if (self.weight_bits or 0) >= 8 else 128

    def effective_symmetric(self) -> bool:
        """Asked for, else asymmetric at <= 4 bits (measured more accurate), symmetric at 8."""
        if self.symmetric is not None:
            return self.symmetric
        return (self.weight_bits or 0) >= 8


def parse_recipe(tokens: list[str], target_text: str) -> Recipe:
    """Builds a Recipe from tokens; raises `TargetError` naming the bad token."""
    recipe = Recipe(tokens=tuple(tokens))
    for raw in tokens:
        token = raw.lower()
        for part in SCHEME_ALIASES.get(token, (token,)):
            recipe = _apply(recipe, part, raw, target_text)
    _check(recipe, target_text)
    return recipe


def _set(recipe: Recipe, raw: str, target: str, **changes) -> Recipe:
    for key, value in changes.items():
        current = getattr(recipe, key)
        if current not in (None, False) and current != value:
            raise TargetError(f"token '{raw}' in target '{target}' conflicts with an earlier token")
    return replace(recipe, **changes)


def _apply(recipe: Recipe, token: str, raw: str, target: str) -> Recipe:
    if m := re.fullmatch(r"w([2348])", token):
        return _set(recipe, raw, target, weight_bits=int(m[1]))
    if m := re.fullmatch(r"w([2-8])\.(\d+)", token):
        bits = float(f"{m[1]}.{m[2]}")
        if not 2 < bits < 8:
            raise TargetError(
                f"token '{raw}' in target '{target}': mixed precision averages between 2 and 8 bits"
            )
        return _set(recipe, raw, target, weight_bits=int(bits), average_bits=bits)
    if m := re.fullmatch(r"w([48])a8", token):
        return _set(recipe, raw, target, weight_bits=int(m[1]), activation_bits=8)
    if token == "fp8":
        return _set(recipe, raw, target, fp8=True)
    if token == "nvfp4":
        return _set(recipe, raw, target, nvfp4=True)
    if m := re.fullmatch(r"g(\d+)", token):
        return _set(recipe, raw, target, group_size=int(m[1]))
    if token == "pc":
        return _set(recipe, raw, target, group_size=-1)
    if token in ("sym", "asym"):
        return _set(recipe, raw, target, symmetric=token == "sym")
    if token in ALGORITHMS:
        return _set(recipe, raw, target, algorithm=token)
    if token in ("dynamic", "static"):
        return _set(recipe, raw, target, dynamic=token == "dynamic")
    if token == "lorc":
        return _set(recipe, raw, target, lorc=True)
    if m := re.fullmatch(r"s(\d+):(\d+)", token):
        n, mm = int(m[1]), int(m[2])
        if not 0 < n < mm:
            raise TargetError(f"token '{raw}' in target '{target}': N:M sparsity needs 0 < N < M")
        return _set(recipe, raw, target, structured_sparsity=(n, mm))
    if m := re.fullmatch(r"sp(\d+)", token):
        percent = int(m[1])
        if not 0 < percent < 100:
            raise TargetError(f"token '{raw}' in target '{target}': sparsity percent must be 1-99")
        return _set(recipe, raw, target, sparsity=percent / 100)
    if m := re.fullmatch(r"lr(0?\.\d+)", token):
        return _set(recipe, raw, target, lowrank=float(m[1]))
    if token == "auto":
        return _set(recipe, raw, target, auto=True)
    examples = [
        "w4",
        "w8",
        "w4a8",
        "w8a8",
        "fp8",
        "g128",
        "pc",
        "sym",
        "asym",
        "gptq",
        "awq",
        "rtn",
        "dynamic",
        "static",
        "lorc",
        "codebook",
        "spqr",
        "s2:4",
        "sp50",
        "lr0.3",
        "auto",
        *[k.upper() for k in SCHEME_ALIASES],
    ]
    raise TargetError(
        f"unknown token '{raw}' in target '{target}'{did_you_mean(token, examples)}; "
        f"valid tokens: {', '.join(TOKEN_HELP)}"
    )


def _check(recipe: Recipe, target: str) -> None:
    if recipe.group_size is not None and recipe.group_size != -1:
        g = recipe.group_size
        if g < 16 or g & (g - 1):
            raise TargetError(f"group size {g} in target '{target}' must be a power of two >= 16")
    if (recipe.group_size is not None or recipe.symmetric is not None or recipe.algorithm) and not (
        recipe.weight_bits
    ):
        raise TargetError(
            f"target '{target}' sets a grid option (group, sym/asym or algorithm) without weight "
            "bits; add w4 or w8"
        )
