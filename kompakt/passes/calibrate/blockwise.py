"""Running calibration batches through the IR one block at a time.

A *stage* is a run of consecutive nodes from the same transformer block (``model.layers.3``,
``encoder.layer.2``, ``transformer.h.0``), or glue between blocks (embeddings, final norm). The
runner keeps, per calibration batch, only the values that cross stage boundaries (hidden states,
masks); a stage's intermediates live only while that stage runs, for one batch at a time. Peak
memory is therefore about one block's working set plus the boundary activations of all batches,
whatever the depth.

A pass walks the stages in order. For each it may collect statistics (running the stage on
every batch without keeping the results), change the IR inside the stage (quantize its weights),
and then let the runner run the stage for real, so later blocks see the compressed outputs, as
GPTQ prescribes.

    runner = BlockwiseRunner(model, feeds)
    for stage in runner.stages():
        stats = stage.collect({x: {"hessian"}})
        ...quantize the stage's MatMuls...
    # leaving the loop body runs the (modified) stage and advances
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import to_torch
from kompakt.passes.calibrate.statistics import ActivationStats, StatRequests
from kompakt.runtime.reference.registry import build_kernel

_BLOCK = re.compile(r"^(?P<block>(?:.+\.)?(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")


def block_of(node: ir.Node) -> str | None:
    """The transformer block a node belongs to (``model.layers.3``), or None for glue."""
    match = _BLOCK.match(module_of(node))
    return match["block"] if match else None


def _drop_after(nodes: list[ir.Node]) -> dict[int, list[int]]:
    """node index -> ids of values produced in ``nodes`` whose last use is that node and that
    nothing outside ``nodes`` (nor the graph's outputs) needs."""
    position = {id(n): i for i, n in enumerate(nodes)}
    drop: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            uses = value.uses()
            if value.is_graph_output() or any(id(u.node) not in position for u in uses):
                continue
            last = max((position[id(u.node)] for u in uses), default=i)
            drop.setdefault(last, []).append(id(value))
    return drop


def _stage_keys(nodes: list[ir.Node]) -> list[str | None]:
    """Block keys per node; glue nodes between two nodes of the same block join that block."""
    keys = [block_of(n) for n in nodes]
    previous: list[str | None] = []
    last = None
    for key in keys:
        last = key if key is not None else last
        previous.append(last)
    following: list[str | None] = [None] * len(keys)
    nxt = None
    for i in range(len(keys) - 1, -1, -1):
        nxt = keys[i] if keys[i] is not None else nxt
        following[i] = nxt
    return [
        key
        if key is not None
        else (previous[i] if previous[i] is not None and previous[i] == following[i] else None)
        for i, key in enumerate(keys)
    ]


@dataclass
class Stage:
    """One stage as a pass sees it."""

    runner: BlockwiseRunner
    index: int
    key: str | None
    nodes: list[ir.Node] = field(default_factory=list)
    bounds: tuple[ir.Node | None, ir.Node | None] = (None, None)  # last node before, first after
    forwarded: bool = False

    @property
    def name(self) -> str:
        return self.key or f"glue {self.index}"

    def collect(self, requests: StatRequests, keep_batches: int = 0) -> dict[int, ActivationStats]:
        """Runs the stage on every batch and returns the requested statistics, keyed by
        ``id(value)``; values asked for as ``tensors`` are kept whole for the first
        ``keep_batches`` batches. Nothing else the stage computes is kept."""
        return self.runner.collect(self, requests, keep_batches)

    def forward_now(self) -> None:
        """Computes the stage's outputs for the next stage now, from the graph as it is now.

        By default the runner does this after the pass is done with the stage, so the next
        stage sees what the compressed stage computes (GPTQ's choice). AWQ, as its authors do,
        calls this once its scales are applied but before it rounds the weights, so later
        layers are calibrated on the float model.
        """
        self.runner._forward(self)
        self.forwarded = True


class BlockwiseRunner:
    """Runs ``model`` stage by stage over ``feeds`` (one dict of graph inputs per batch)."""

    def __init__(self, model: ir.Model, feeds: list[Mapping[str, torch.Tensor]]) -> None:
        self.model = model
        self.graph = model.graph
        self.envs: list[dict[int, torch.Tensor]] = []
        for feed in feeds:
            self.envs.append({id(v): feed[v.name] for v in self.graph.inputs if v.name in feed})
        self._constants: dict[int, torch.Tensor] = {}
        self._kernels: dict[int, object] = {}

    def num_stages(self) -> int:
        keys = _stage_keys(list(self.graph))
        return 1 + sum(1 for a, b in zip(keys, keys[1:], strict=False) if a != b) if keys else 0

    def stages(self) -> Iterator[Stage]:
        """Yields the stages in order; after each yield, runs that stage (as it is then)."""
        nodes = list(self.graph)
        keys = _stage_keys(nodes)
        bounds = [0] + [i for i in range(1, len(nodes)) if keys[i] != keys[i - 1]]
        firsts = [nodes[i] for i in bounds]
        keys_of = [keys[i] for i in bounds]
        previous_last: ir.Node | None = None
        for index, key in enumerate(keys_of):
            next_first = firsts[index + 1] if index + 1 < len(firsts) else None
            bounds = (previous_last, next_first)
            stage = Stage(self, index, key, self._between(*bounds), bounds)
            yield stage
            current = self._between(previous_last, next_first)  # the pass may have added nodes
            if not stage.forwarded:
                self._forward(stage)
            self._free(current[-1] if current else previous_last)
            self._constants.clear()
            self._kernels.clear()
            previous_last = current[-1] if current else previous_last

    def _forward(self, stage: Stage) -> None:
        """Runs the stage as the graph now is on every batch, leaving its outputs in the envs.

        Cached constants are dropped first: a pass may have rewritten a weight or a norm
        constant in place (SmoothQuant's scales, AWQ's folds), and the next stage must see this
        stage as the pass left it, not as it was.
        """
        self._constants.clear()
        for env in self.envs:
            self._run(self._between(*stage.bounds), env)

    def collect(
        self, stage: Stage, requests: StatRequests, keep_batches: int = 0
    ) -> dict[int, ActivationStats]:
        stats = {key: ActivationStats(kinds, keep_batches) for key, kinds in requests.items()}
        nodes = self._between_stage(stage)
        for env in self.envs:
            scratch = dict(env)
            for key, stat in stats.items():  # requested values that come from earlier stages
                if key in scratch:
                    stat.add(scratch[key])
            self._run(nodes, scratch, stats=stats)
        for key, stat in stats.items():
            stat.finish(self._label(key, nodes))
        return stats

    def forget(self, value: ir.Value) -> None:
        """Drops ``value``'s cached constant: a pass that has just replaced a weight calls it, so
        the float weight is freed now rather than when the stage ends."""
        self._constants.pop(id(value), None)

    def _between_stage(self, stage: Stage) -> list[ir.Node]:
        """The stage's nodes now (the pass may have inserted some since it was yielded)."""
        if not stage.nodes:
            return []
        wanted = {id(n) for n in stage.nodes}
        nodes = list(self.graph)
        positions = [i for i, n in enumerate(nodes) if id(n) in wanted]
        return nodes[positions[0] : positions[-1] + 1] if positions else []

    def _between(self, after: ir.Node | None, before: ir.Node | None) -> list[ir.Node]:
        out, started = [], after is None
        for node in self.graph:
            if node is before:
                break
            if started:
                out.append(node)
            elif node is after:
                started = True
        return out

    def _value(self, value: ir.Value, env: dict[int, torch.Tensor]) -> torch.Tensor:
        key = id(value)
        if key in env:
            return env[key]
        if value.const_value is not None:
            if key not in self._constants:
                self._constants[key] = to_torch(value.const_value)
            return self._constants[key]
        raise KompaktError(f"calibration: value '{value.name}' is used before it is computed")

    def _kernel(self, node: ir.Node):
        kernel = self._kernels.get(id(node))
        if kernel is None:
            domain = node.domain if node.domain != "ai.onnx" else ""
            opset = node.version or self.model.opset_imports.get(domain, 1)
            kernel = self._kernels[id(node)] = build_kernel(node, opset)
        return kernel

    def run_nodes(self, nodes: list[ir.Node], env: dict[int, torch.Tensor]) -> None:
        """Runs ``nodes`` on one batch's ``env`` (``id(value)`` -> tensor), adding their outputs.
        A value present in ``env`` takes precedence over the IR's constant (to try weights)."""
        self._run(nodes, env)

    def _run(self, nodes, env, stats=None) -> None:
        """Runs ``nodes`` for one batch, writing their outputs into ``env``. A value produced
        here and used only here is dropped after its last use (a dequantized weight is as large
        as the float weight was)."""
        drop = _drop_after(nodes)
        for index, node in enumerate(nodes):
            args = [None if v is None else self._value(v, env) for v in node.inputs]
            try:
                result = self._kernel(node)(*args)
            except KompaktError:
                raise
            except Exception as err:
                raise KompaktError(
                    f"calibration: op '{node.op_type}' at node '{node.name}' "
                    f"(module '{module_of(node)}') failed: {type(err).__name__}: {err}"
                ) from err
            results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            for value, tensor in zip(node.outputs, results, strict=False):
                env[id(value)] = tensor
                if stats is not None and id(value) in stats:
                    stats[id(value)].add(tensor)
            for key in drop.get(index, ()):
                env.pop(key, None)

    def _free(self, last_run: ir.Node | None) -> None:
        """Drops values that no node after ``last_run`` (and no graph output) still needs."""
        position = {id(n): i for i, n in enumerate(self.graph)}
        done = position.get(id(last_run), -1) if last_run is not None else -1
        outputs = {id(v) for v in self.graph.outputs}
        values = {id(v): v for env in self.envs[:1] for v in self._values_in(env)}
        dead = [
            key
            for key, value in values.items()
            if key not in outputs
            and all(position.get(id(u.node), -1) <= done for u in value.uses())
        ]
        for env in self.envs:
            for key in dead:
                env.pop(key, None)

    def _values_in(self, env: dict[int, torch.Tensor]) -> list[ir.Value]:
        known = {id(v): v for v in self.graph.inputs}
        for node in self.graph:
            for v in node.outputs:
                known[id(v)] = v
        return [known[k] for k in env if k in known]

    def _label(self, key: int, nodes: list[ir.Node]) -> str:
        for node in nodes:
            for value in node.inputs:
                if value is not None and id(value) == key:
                    return f"input of '{module_of(node) or node.name}'"
        return "an activation"

    def outputs(self) -> list[list[torch.Tensor]]:
        """Graph outputs per batch, once every stage has run."""
        return [[env[id(v)] for v in self.graph.outputs] for env in self.envs]
