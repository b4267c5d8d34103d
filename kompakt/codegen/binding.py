"""What every binder reads off a fused node: which input plays which role."""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir

from kompakt.errors import CodegenError


def input_roles(node: ir.Node, known: Collection[str], where: str) -> dict[str, int]:
    """role -> input index, from the node's ``roles`` attribute (one per input).

    One input may fill several roles, written ``k+v``. Raises `CodegenError` naming ``where``
    when the attribute is missing, does not cover every input, or names a role not in ``known``.
    """
    attr = node.attributes.get("roles")
    roles = list(attr.as_strings()) if attr is not None else None
    if roles is None or len(roles) != len(node.inputs):
        raise CodegenError(f"{where}: 'roles' must name each of its {len(node.inputs)} inputs")
    index: dict[str, int] = {}
    for i, combined in enumerate(roles):
        for role in combined.split("+"):
            if role not in known:
                raise CodegenError(f"{where}: input {i} has the unknown role '{role}'")
            index[role] = i
    return index
