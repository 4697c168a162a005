"""Refuse nodes that leave a required input empty.

ONNX writes an omitted optional input as the empty name ``""``. The onnx checker does not
check that the omitted input really is optional, and onnxruntime trusts it: a ``Sum`` whose
third input is ``""`` passes the checker and session creation, then crashes the whole
process (SIGSEGV) on its first run (found by fuzzing, onnx 1.23 / onnxruntime 1.32). So
:func:`check_required_inputs` compares every empty input with the operator's schema.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx.defs import OpSchema

from onnxshrink.errors import ModelLoadError


def check_required_inputs(model: onnx.ModelProto, graphs: list[onnx.GraphProto], path: Path) -> None:
    """Raise :class:`ModelLoadError` if a standard-domain node leaves a non-optional input empty.

    Args:
        model: the model (for its opset imports).
        graphs: the main graph and its subgraphs (already vetted for nesting depth).
        path: the model file, named in the error.
    """
    opset = _default_opset(model.opset_import)
    groups = [(opset, graph.node) for graph in graphs]
    # onnxruntime inlines model-local functions, each with its own opset imports.
    groups += [(_default_opset(function.opset_import), function.node) for function in model.functions]
    for version, nodes in groups:
        if version is None:
            continue
        for node in nodes:
            if node.domain not in ("", "ai.onnx") or "" not in node.input:
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, version, "")
            except onnx.defs.SchemaError:
                continue  # an unknown op is the checker's (or onnxruntime's) to report
            for index, name in enumerate(node.input):
                if name == "" and not _is_optional(schema, index):
                    what = f"'{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
                    raise ModelLoadError(f"{what} leaves its required input {index} empty", path=path)


def _default_opset(imports: Iterable[onnx.OperatorSetIdProto]) -> int | None:
    return next((o.version for o in imports if o.domain in ("", "ai.onnx")), None)


def _is_optional(schema: OpSchema, index: int) -> bool:
    formals = schema.inputs
    if not formals:
        return True
    formal = formals[index] if index < len(formals) else formals[-1]
    if index >= len(formals) and formal.option != OpSchema.FormalParameterOption.Variadic:
        return True  # too many inputs: the checker's to report
    return formal.option == OpSchema.FormalParameterOption.Optional
