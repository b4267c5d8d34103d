"""Per-layer overrides: a different recipe (or none) for the weights a module-path glob matches.

    compile(model, target="a100-w4", overrides={"*.down_proj": "w8", "lm_head": None})

Each value is a recipe written as in a target string without the device (``"w8"``,
``"w3-g64-gptq"``, ``"w8-pc-sym"``), or ``None`` to keep the matched weights in float. The
target's own weight pass is told to leave every overridden glob alone (``exclude``); each
recipe then becomes one more weight pass limited to its glob (``only``), placed right after the
target's weight pass, so passes that follow (activation quantization, low-rank compensation) see
every weight already quantized. When several globs match one weight, the first one given wins.
A glob that matches an output projection applies to it (the lm_head is kept in float only by
default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kompakt.errors import TargetError
from kompakt.passes.base import Pass
from kompakt.passes.pipeline import Pipeline
from kompakt.targets.target import Target

WEIGHTS_QUANTIZED = "weights-quantized"


def apply_overrides(
    pipeline: Pipeline,
    overrides: Mapping[str, str | None],
    target: Target,
    calibrated: bool,
) -> Pipeline:
    """The pipeline with ``overrides`` applied; raises `TargetError` naming a bad entry."""
    if not isinstance(overrides, Mapping):
        raise TargetError(
            "overrides must be a dict of module-path glob -> recipe (e.g. {'*.down_proj': 'w8'}) "
            f"or None; got {type(overrides).__name__}"
        )
    passes = pipeline.passes
    weight_index = next(
        (i for i, p in enumerate(passes) if WEIGHTS_QUANTIZED in p.provides and _selectable(p)),
        None,
    )
    if weight_index is None:
        raise TargetError(
            f"overrides need a weight-quantization pass to override, and '{pipeline}' has none; "
            "use a target with weight bits (e.g. 'cpu-w4') or a pipeline with one"
        )
    globs = list(overrides)
    extra: list[Pass] = []
    for index, (glob, recipe) in enumerate(overrides.items()):
        if not isinstance(glob, str) or not glob:
            raise TargetError(f"override keys are module-path globs (strings); got {glob!r}")
        if recipe is None:
            continue
        if not isinstance(recipe, str):
            raise TargetError(
                f"override '{glob}': a recipe is a string like 'w8' or 'w3-g64-gptq', or None; "
                f"got {type(recipe).__name__}"
            )
        extra.append(_override_pass(glob, recipe, globs[:index], target, calibrated))
    main = passes[weight_index]
    main = dataclasses.replace(main, exclude=tuple(main.exclude) + tuple(globs))
    new = [*passes[:weight_index], main, *extra, *passes[weight_index + 1 :]]
    return Pipeline(new)


def _selectable(p: Pass) -> bool:
    fields = {f.name for f in dataclasses.fields(p)}
    return {"exclude", "only", "keep_lm_head"} <= fields


def _override_pass(
    glob: str, recipe: str, earlier: list[str], target: Target, calibrated: bool
) -> Pass:
    text = f"{target.device.name}-{recipe}"
    try:
        sub = Target.parse(text).default_pipeline(calibrated)
    except TargetError as err:
        raise TargetError(f"override '{glob}': recipe '{recipe}': {err}") from err
    weight_passes = [p for p in sub.passes if WEIGHTS_QUANTIZED in p.provides]
    if len(weight_passes) != 1 or len(sub.passes) != 2 or not _selectable(weight_passes[0]):
        raise TargetError(
            f"override '{glob}': recipe '{recipe}' must be a weight-only recipe (e.g. 'w8', "
            f"'w3-g64-gptq'); it expands to '{sub}'"
        )
    return dataclasses.replace(
        weight_passes[0], only=(glob,), exclude=tuple(earlier), keep_lm_head=False
    )
