"""Which weights a weight-compression pass may touch, and why the others are left alone.

A *weight site* is one constant [K, N] float weight together with the MatMuls that read it as
their second input. A site is skipped, with a reason the report shows, when:
- a module-path glob in ``exclude`` matches it (globs also match the weight's own name, for ONNX
  files that carry no module paths);
- it is the output projection (``lm_head``) and ``keep_lm_head`` is set;
- the weight has another use besides MatMul input 1 (e.g. tied to an embedding Gather), since
  replacing it would change that use too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from kompakt.ir.metadata import module_of

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
LM_HEAD_NAMES = ("lm_head", "embed_out")
"""Last module-path components of output projections in Hugging Face models."""


@dataclass
class WeightSite:
    weight: ir.Value
    matmuls: list[ir.Node] = field(default_factory=list)

    @property
    def module(self) -> str:
        return module_of(self.matmuls[0]) if self.matmuls else ""

    @property
    def label(self) -> str:
        """The module path, or the weight's name when the module is unknown."""
        return self.module or self.weight.name or "?"


@dataclass
class Skipped:
    label: str
    reason: str


def matches(site: WeightSite, patterns: Sequence[str]) -> bool:
    names = {site.weight.name or ""} | {module_of(n) for n in site.matmuls}
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names if name)


def is_lm_head(site: WeightSite) -> bool:
    return any(module_of(n).rsplit(".", 1)[-1] in LM_HEAD_NAMES for n in site.matmuls)


def weight_sites(graph: ir.Graph) -> list[WeightSite]:
    """Every constant 2-D float weight read by a MatMul as its second input, in graph order."""
    sites: dict[int, WeightSite] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        if (
            weight is None
            or not weight.is_initializer()
            or weight.const_value is None
            or weight.dtype not in _FLOAT_TYPES
            or len(weight.const_value.shape) != 2
        ):
            continue
        sites.setdefault(id(weight), WeightSite(weight)).matmuls.append(node)
    return list(sites.values())


def select_weights(
    graph: ir.Graph,
    exclude: Sequence[str] = (),
    keep_lm_head: bool = True,
    only: Sequence[str] = (),
) -> tuple[list[WeightSite], list[Skipped]]:
    """Sites a pass may compress, and the ones it must leave (with the reason).

    ``only``, when given, limits the pass to sites matching one of its globs (per-layer
    overrides); the others are left silently, as they belong to another pass.
    """
    chosen, skipped = [], []
    for site in weight_sites(graph):
        if only and not matches(site, only):
            continue
        if exclude and matches(site, exclude):
            skipped.append(Skipped(site.label, "excluded by pattern"))
        elif keep_lm_head and is_lm_head(site):
            skipped.append(Skipped(site.label, "output projection kept in float (keep-lm-head)"))
        elif len(site.weight.uses()) != len(site.matmuls) or any(
            use.idx != 1 for use in site.weight.uses()
        ):
            skipped.append(Skipped(site.label, "weight is also used outside MatMul (tied?)"))
        else:
            chosen.append(site)
    return chosen, skipped
