"""``kompakt::FusedKernel``: runs the fused node's body subgraph, which is its definition.

Fusion never changes what a graph computes on the reference runtime: the body holds exactly the
nodes the fusion pass took out of the graph. Kernel families are tested against this.
"""

from __future__ import annotations

from kompakt.errors import KompaktError
from kompakt.ir.fused import DOMAIN, FUSED_KERNEL, body_of
from kompakt.runtime.reference._common import op
from kompakt.runtime.reference.registry import Kernel, NodeInfo


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
    plan = ExecutionPlan(body, opset_imports={"": opset}, host_inputs=shapes_only)
    names = plan.input_names

    def kernel(*inputs):
        return tuple(plan.run(dict(zip(names, inputs, strict=True))))

    return kernel
