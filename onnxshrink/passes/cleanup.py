"""Lossless clean-ups: dead nodes, unused initializers, unused opset imports."""

from __future__ import annotations

import heapq

import onnx

from onnxshrink.errors import UnsupportedModelError
from onnxshrink.modelio import iter_graphs


class GraphOrderError(UnsupportedModelError, ValueError):
    """The graph has a cycle or reads a tensor that nothing produces.

    A ShrinkError (one line, exit 1) and still the ValueError that ``topological_sort``
    documents. Seen when onnxruntime's quantizer rewires a graph whose input is also an output.
    """


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in iter_graphs(g):
                for n in sub.node:
                    names.update(n.input)
    return names


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes whose outputs reach no graph output; return how many."""
    live = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live.update(i for i in node.input if i)
            live.update(_subgraph_inputs(node))
    removed = len(graph.node) - len(keep)
    if removed:
        keep.reverse()
        del graph.node[:]
        graph.node.extend(keep)
    return removed


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    used: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        used.update(_subgraph_inputs(node))
    keep = [t for t in graph.initializer if t.name in used]
    removed = len(graph.initializer) - len(keep)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return removed


def prune_opset_imports(model: onnx.ModelProto) -> None:
    """Keep only the opset imports the graph uses (plus the default domain)."""
    used = {"", "ai.onnx"}
    for graph in iter_graphs(model.graph):
        used.update(n.domain for n in graph.node)
    for fn in model.functions:
        used.add(fn.domain)
        used.update(n.domain for n in fn.node)
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def cleanup(model: onnx.ModelProto) -> dict[str, int]:
    """All clean-ups, in place; returns what each removed."""
    return {
        "dead_nodes": remove_dead_nodes(model.graph),
        "unused_initializers": remove_unused_initializers(model.graph),
    }


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so that every input is produced before it is read (in place).

    Stable: of the nodes that are ready, the earliest in the current order goes first, so an
    ordered graph is left as it is (Kahn's algorithm with a heap, O(n log n): onnxruntime's
    quantizer appends its Q/DQ nodes at the end, which repeated passes would pay for
    quadratically).

    Raises:
        GraphOrderError: (a ValueError) if the graph has a cycle or reads a tensor nothing
            produces.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    available |= {t.values.name for t in graph.sparse_initializer}
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and name not in available:
                producer.setdefault(name, index)
    waiting = [0] * len(nodes)  # how many distinct producers each node still waits for
    readers: dict[int, list[int]] = {}
    missing: set[str] = set()
    for index, node in enumerate(nodes):
        needs = set(node.input) | _subgraph_inputs(node) - _subgraph_locals(node)
        sources = set()
        for name in needs - available:
            if name in producer:
                sources.add(producer[name])
            else:
                missing.add(name)
        waiting[index] = len(sources)
        for source in sources:
            readers.setdefault(source, []).append(index)
    if missing:
        raise GraphOrderError(f"graph has a cycle or undefined inputs: {sorted(missing)[:3]}")
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered: list[onnx.NodeProto] = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for reader in readers.get(index, ()):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(ordered) != len(nodes):
        stuck = sorted({name for i, n in enumerate(nodes) if waiting[i] for name in n.input if name in producer})[:3]
        raise GraphOrderError(f"graph has a cycle or undefined inputs: {stuck}")
    del graph.node[:]
    graph.node.extend(ordered)


def _subgraph_locals(node: onnx.NodeProto) -> set[str]:
    """Names defined inside a node's subgraphs (their own inputs, initializers and outputs)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in iter_graphs(g):
                names.update(i.name for i in sub.input)
                names.update(t.name for t in sub.initializer)
                for n in sub.node:
                    names.update(n.output)
    return names
