"""Fusion passes: groups of nodes that one kernel runs become ``kompakt::FusedKernel`` nodes.

Each pass finds one kind of group, checks it can be fused (single consumers inside the group, the
shapes a kernel family takes) and calls `kompakt.ir.fused.fuse_nodes`. The fused node's body keeps
the original nodes, so the reference runtime still runs the fused IR and every fusion is checked
against it; `pattern` names the kernel family the Triton backend launches.
"""
