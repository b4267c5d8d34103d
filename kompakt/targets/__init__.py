"""Targets: hardware presets, recipe tokens, `Target.parse`, and the cost model."""

from kompakt.targets.cost_model import CostModel, NodeCost
from kompakt.targets.hardware import PRESETS, HardwareSpec, get_device
from kompakt.targets.recipe import Recipe
from kompakt.targets.target import Target

__all__ = ["PRESETS", "CostModel", "HardwareSpec", "NodeCost", "Recipe", "Target", "get_device"]
