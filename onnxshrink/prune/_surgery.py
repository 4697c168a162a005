"""Apply a channel selection to the model: slice constants, fix attributes, tidy up.

Everything is computed first (new arrays, attribute values); the proto is only touched
once the whole plan is known, so an error leaves the model as it was. A constant used in
one place is rewritten under its own name; a constant shared with other uses (tied weights,
or the TorchScript exporter's Identity copies of equal biases) gets a sliced copy for the
uses that change, and the original is dropped when nothing reads it any more.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.prune._graph import GraphIndex
from onnxshrink.prune._layout import (
    Selection,
    SetGroups,
    ShapeEntry,
    SliceBounds,
    SliceConst,
    SplitSizes,
    layout_length,
)
from onnxshrink.prune.graph_channels import ChannelGraph
from onnxshrink.stats import weightless_copy

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (node index, input index)


@dataclass
class Plan:
    """New values for constant inputs and attributes, and tensors whose shape changes."""

    values: dict[Key, np.ndarray] = field(default_factory=dict)
    new_inputs: dict[int, np.ndarray] = field(default_factory=dict)  # node -> appended 'split' input
    int_attrs: dict[tuple[int, str], int] = field(default_factory=dict)
    ints_attrs: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    drop_attrs: set[tuple[int, str]] = field(default_factory=set)
    resized: set[str] = field(default_factory=set)
    original_sizes: dict[Key, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.values or self.new_inputs or self.int_attrs or self.ints_attrs)


def plan_selection(graph: ChannelGraph, selection: Selection) -> Plan:
    """Work out every change pruning ``selection`` implies, without touching the model."""
    ix = graph.index
    plan = Plan()
    cuts: dict[Key, dict[int, np.ndarray]] = defaultdict(dict)
    for edit in graph.edits:
        if isinstance(edit, SliceConst):
            kept = selection.indices(edit.layout)
            if kept is not None:
                axes = cuts[(edit.node, edit.input)]
                if edit.axis in axes and not np.array_equal(axes[edit.axis], kept):
                    raise AssertionError(
                        f"conflicting slices of input {edit.input} of node {ix.key(edit.node)}"
                    )
                axes[edit.axis] = kept
        elif isinstance(edit, ShapeEntry):
            new = selection.length(edit.layout)
            if new != layout_length(edit.layout):
                key = (edit.node, edit.input)
                value = np.array(plan.values.get(key, _const(ix, key)))
                value.reshape(-1)[edit.position] = new
                plan.values[key] = value
        elif isinstance(edit, SplitSizes):
            sizes = [selection.length(lay) for lay in edit.layouts]
            if sizes != [layout_length(lay) for lay in edit.layouts]:
                _plan_split(ix, plan, edit.node, sizes)
        elif isinstance(edit, SliceBounds):
            begin, length = selection.length(edit.prefix), selection.length(edit.out)
            if (begin, length) != (layout_length(edit.prefix), layout_length(edit.out)):
                for j, bound in ((1, begin), (2, begin + length)):
                    key = (edit.node, j)
                    array = np.array(plan.values.get(key, _const(ix, key)))
                    array.reshape(-1)[edit.position] = bound
                    plan.values[key] = array
        elif isinstance(edit, SetGroups):
            root = graph.classes.find(edit.space)
            units = graph.classes.units[root]
            kept_units = selection.kept_units.get(root)
            if kept_units is not None and len(kept_units) < units:
                plan.int_attrs[(edit.node, "group")] = edit.groups * len(kept_units) // units
    for key, axes in cuts.items():
        array = _const(ix, key)
        plan.original_sizes[key] = array.size
        for axis, kept in axes.items():
            array = np.take(array, kept, axis=axis)
        plan.values[key] = np.ascontiguousarray(array)
    for name, info in graph.infos.items():
        if selection.length(info.layout) != layout_length(info.layout):
            plan.resized.add(name)
    return plan


def _const(ix: GraphIndex, key: Key) -> np.ndarray:
    value = ix.const(ix.nodes[key[0]].input[key[1]])
    if value is None:  # the analysis only records edits of constants
        raise AssertionError(f"input {key[1]} of node {ix.key(key[0])} is not a constant")
    return value


def _plan_split(ix: GraphIndex, plan: Plan, node_index: int, sizes: list[int]) -> None:
    node = ix.nodes[node_index]
    if ix.opset >= 13:
        if len(node.input) > 1 and node.input[1]:
            plan.values[(node_index, 1)] = np.asarray(sizes, dtype=np.int64)
        else:
            plan.new_inputs[node_index] = np.asarray(sizes, dtype=np.int64)
            plan.drop_attrs.add((node_index, "num_outputs"))
    else:
        plan.ints_attrs[(node_index, "split")] = sizes


def apply_plan(model: onnx.ModelProto, graph: ChannelGraph, plan: Plan) -> None:
    """Write ``plan`` into ``model`` (the model ``graph`` was computed from), in place."""
    if plan.empty:
        return
    ix = graph.index
    names = _NameMaker(model)
    created: dict[tuple[str, str], str] = {}
    touched: set[str] = set()
    for (node_index, input_index), array in plan.values.items():
        node = ix.nodes[node_index]
        name = node.input[input_index]
        source = ix.const_source(name)
        assert source is not None
        touched.add(source)
        exclusive = (
            name == source
            and source in ix.initializers
            and ix.const_uses(source) == [(node_index, input_index)]
            and not ix.const_escapes(source)
        )
        if exclusive:
            ix.initializers[source].CopyFrom(numpy_helper.from_array(array, source))
            continue
        digest = (
            source,
            hashlib.sha1(array.tobytes() + str((array.dtype, array.shape)).encode()).hexdigest(),
        )
        if digest not in created:
            created[digest] = names.make(f"{source}_pruned")
            model.graph.initializer.append(numpy_helper.from_array(array, created[digest]))
        node.input[input_index] = created[digest]
    for node_index, array in plan.new_inputs.items():
        node = ix.nodes[node_index]
        name = names.make(f"{node.name or node.op_type}_split")
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        node.input.append(name)
    for (node_index, attr_name), value in plan.int_attrs.items():
        _set_attr(ix.nodes[node_index], attr_name, value)
    for (node_index, attr_name), values in plan.ints_attrs.items():
        _set_attr(ix.nodes[node_index], attr_name, values)
    for node_index, attr_name in plan.drop_attrs:
        node = ix.nodes[node_index]
        kept = [a for a in node.attribute if a.name != attr_name]
        del node.attribute[:]
        node.attribute.extend(kept)
    _drop_dead_constants(model, ix, touched)
    _refresh_value_info(model, plan.resized | touched)


def _set_attr(node: onnx.NodeProto, name: str, value: int | list[int]) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(onnx.helper.make_attribute(name, value))


class _NameMaker:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = {t.name for t in model.graph.initializer}
        self.used |= {
            v.name for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
        }
        for node in model.graph.node:
            self.used.update(node.output)
            self.used.update(node.input)

    def make(self, base: str) -> str:
        name, n = base, 1
        while name in self.used:
            n += 1
            name = f"{base}{n}"
        self.used.add(name)
        return name


def _drop_dead_constants(model: onnx.ModelProto, ix: GraphIndex, touched: set[str]) -> None:
    """Remove the Identity/Constant nodes and initializers our rewiring left unread."""
    graph = model.graph
    keep_always = ix.graph_outputs | ix.subgraph_reads
    while True:
        read = {n for node in graph.node for n in node.input} | keep_always
        dead = {
            k
            for k, node in enumerate(graph.node)
            if node.op_type in ("Identity", "Constant")
            and node.domain in ("", "ai.onnx")
            and ix.const_source(node.output[0]) in touched
            and not any(out in read for out in node.output)
        }
        if not dead:
            break
        kept = [n for k, n in enumerate(graph.node) if k not in dead]
        del graph.node[:]
        graph.node.extend(kept)
    read = {n for node in graph.node for n in node.input} | keep_always
    kept_inits = [t for t in graph.initializer if t.name not in touched or t.name in read]
    if len(kept_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)


def _refresh_value_info(model: onnx.ModelProto, resized: set[str]) -> None:
    """Bring value_info of resized tensors and rewritten constants up to date.

    Entries for initializers are rebuilt from the tensors; those of activations are
    dropped and re-inferred (value_info is optional, so a failed inference only logs).
    """
    graph = model.graph
    if not any(v.name in resized for v in graph.value_info):
        return
    inits = {t.name: t for t in graph.initializer}
    kept: list[onnx.ValueInfoProto] = []
    for v in graph.value_info:
        if v.name not in resized:
            kept.append(v)
        elif v.name in inits:
            t = inits[v.name]
            kept.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.value_info[:]
    graph.value_info.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - value_info is optional; the model is valid without it
        log.info("shape inference after pruning failed (%s); value_info left without resized tensors", exc)
        return
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name in resized)
