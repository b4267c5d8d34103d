"""``kompakt::FusedKernel``: runs the fused node's body subgraph, which is its definition.

Fusion never changes what a graph computes on the reference runtime: the body holds exactly the
nodes the fusion pass took out of the graph. Kernel families are tested against this.
"""

from __future__ import annotations

import torch

from kompakt.errors import KompaktError
from kompakt.ir.fused import DOMAIN, FUSED_KERNEL, body_of
from kompakt.runtime.reference._common import op
from kompakt.runtime.reference.registry import Kernel, NodeInfo

_CPU = torch.device("cpu")


@op(FUSED_KERNEL, domain=DOMAIN)
def fused_kernel(node: NodeInfo) -> Kernel:
    from kompakt.runtime.host_values import fused_host_reads
    from kompakt.runtime.plan import ExecutionPlan  # the plan imports this table

    try:
        body = body_of(node.node)
    except KompaktError as err:
        raise node.unsupported(str(err)) from err
    opset = node.attr("opset", 21)
    shapes_only = [body.inputs[i].name for i in fused_host_reads(node.node)]
    names = [v.name for v in body.inputs]
    data = [i for i, name in enumerate(names) if name not in shapes_only]
    # One plan per device, since a body's own constants live there; the CPU one is built now,
    # so that an op the runtime lacks is reported when the graph is loaded, not when it runs.
    plans = {_CPU: ExecutionPlan(body, _CPU, {"": opset}, host_inputs=shapes_only)}

    def kernel(*inputs):
        device = next((inputs[i].device for i in data if inputs[i] is not None), _CPU)
        plan = plans.get(device)
        if plan is None:
            plan = ExecutionPlan(body, device, {"": opset}, host_inputs=shapes_only)
            plans[device] = plan
        return tuple(plan.run(dict(zip(names, inputs, strict=True))))

    return kernel
