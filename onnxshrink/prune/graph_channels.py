"""Channel dependency analysis: which channels of an ONNX graph must be pruned together.

The analysis walks the top-level graph once, in its (topological) node order, and tracks
for every tensor which axis carries channels and where those channels come from (a
:class:`~onnxshrink.prune._layout.ChannelInfo`). Producers (Conv, ConvTranspose, Gemm,
MatMul with a constant weight) start a new channel *space*; per-op rules in
:mod:`onnxshrink.prune._rules` carry layouts through the graph, merge spaces that must be
pruned alike (element-wise ops, depthwise and grouped convs, squeeze-and-excitation gates)
and record the *edits* that pruning a channel implies: weight and bias slices, norm
parameters, broadcast constants, ``group`` attributes, Reshape/Split/Slice/Resize constants.

Anything the rules do not understand blocks the spaces involved: an unknown op, a
channel-mixing Reshape (channel shuffle), a normalisation over channels, a tensor that is a
graph output or read by a subgraph, a weight that is not a constant. A blocked class is
never pruned, and its reasons are reported. The analysis never changes the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxshrink.prune._graph import GraphIndex
from onnxshrink.prune._layout import (
    ChannelInfo,
    Classes,
    Edit,
    FilterSource,
    GammaSource,
    Layout,
    MacTerm,
    Seg,
    SetGroups,
    SkipReason,
    SliceConst,
    Space,
    boundaries,
    layout_spaces,
)

log = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """Channels that are pruned together (one coupling class of the analysis).

    Attributes:
        id: ``g<N>``, stable for a given model.
        root: the class's id in the analysis.
        spaces: the member spaces (one per producing node output).
        units: how many prunable units the group has; a unit is one channel unless a
            grouped convolution couples whole groups of channels.
        channels: channels of each member space, in ``spaces`` order.
        producers: names of the producing nodes, in ``spaces`` order.
        nodes: every node whose weights, attributes or constants pruning would change.
        weights: names of the constants pruning would slice.
        skip_reasons: empty when the group can be pruned.
    """

    id: str
    root: int
    spaces: list[int]
    units: int
    channels: list[int]
    producers: list[str]
    nodes: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    skip_reasons: list[SkipReason] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.skip_reasons

    @property
    def unit_width(self) -> int:
        """Channels per unit in the narrowest member."""
        return min(self.channels) // self.units

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "producers": self.producers,
            "channels": self.channels,
            "units": self.units,
            "nodes": self.nodes,
            "skip_reasons": [{"kind": r.kind, "detail": r.detail} for r in self.skip_reasons],
        }


class ChannelGraph:
    """The result of :func:`analyze_channels`: groups, and the edits pruning them implies."""

    def __init__(self, analyzer: Analyzer) -> None:
        self.index = analyzer.ix
        self.classes = analyzer.classes
        self.spaces = analyzer.spaces
        self.infos = analyzer.info
        self.edits = analyzer.edits
        self.mac_terms = analyzer.mac_terms
        self.filters = analyzer.filters
        self.gammas = analyzer.gammas
        self.groups: list[ChannelGroup] = []
        touched: dict[int, dict[int, None]] = defaultdict(dict)  # root -> ordered node set
        weights: dict[int, dict[str, None]] = defaultdict(dict)
        for edit in self.edits:
            for sid in edit_spaces(edit):
                root = self.classes.find(sid)
                touched[root][edit.node] = None
                if isinstance(edit, SliceConst):
                    source = self.index.const_source(self.index.nodes[edit.node].input[edit.input])
                    if source:
                        weights[root][source] = None
        members: dict[int, list[int]] = defaultdict(list)
        for space in self.spaces:
            members[self.classes.find(space.id)].append(space.id)
        for n, root in enumerate(self.classes.roots()):
            sids = members[root]
            self.groups.append(
                ChannelGroup(
                    id=f"g{n}",
                    root=root,
                    spaces=sids,
                    units=self.classes.units[root],
                    channels=[self.spaces[s].size for s in sids],
                    producers=[self.index.key(self.spaces[s].node) for s in sids],
                    nodes=[self.index.key(i) for i in touched[root]],
                    weights=list(weights[root]),
                    skip_reasons=list(self.classes.reasons[root]),
                )
            )
        self._by_root = {g.root: g for g in self.groups}

    def group_of_space(self, sid: int) -> ChannelGroup:
        return self._by_root[self.classes.find(sid)]

    def find_group(self, key: str) -> ChannelGroup | None:
        """The group with id ``key``, or whose producer node / weight is named ``key``."""
        for g in self.groups:
            if g.id == key:
                return g
        for g in self.groups:
            if key in g.producers:
                return g
        for space in self.spaces:
            node = self.index.nodes[space.node]
            if len(node.input) > 1 and node.input[1] == key:
                return self.group_of_space(space.id)
        return None

    def skip(self, group: ChannelGroup, reason: SkipReason) -> None:
        """Mark a group as not to be pruned (e.g. excluded by the user)."""
        self.classes.block(group.root, reason)
        if reason not in group.skip_reasons:
            group.skip_reasons.append(reason)


def edit_spaces(edit: Edit) -> set[int]:
    from onnxshrink.prune._layout import edit_layouts

    if isinstance(edit, SetGroups):
        return {edit.space}
    return {sid for layout in edit_layouts(edit) for sid in layout_spaces(layout)}


class Analyzer:
    """Mutable state of one analysis run; the per-op rules act on it."""

    def __init__(self, index: GraphIndex) -> None:
        self.ix = index
        self.classes = Classes()
        self.spaces: list[Space] = []
        self.info: dict[str, ChannelInfo] = {}
        self.edits: list[Edit] = []
        self.mac_terms: list[MacTerm] = []
        self.filters: list[FilterSource] = []
        self.gammas: list[GammaSource] = []

    # ------------------------------------------------------------------ driving

    def run(self) -> None:
        from onnxshrink.prune import _rules_shape  # noqa: F401 - registers the shape-op rules
        from onnxshrink.prune._rules import PRODUCERS, RULES

        for i, node in enumerate(self.ix.nodes):
            ins = [self.info.get(name) if name else None for name in node.input]
            if not any(ins) and node.op_type not in PRODUCERS:
                continue  # nothing prunable flows through this node
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                what = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                self.block_inputs(ins, "unsupported-op", f"{what} node '{self.name(i)}' is not supported")
                continue
            rule(self, i, node, ins)
        for name, info in self.info.items():
            if name in self.ix.graph_outputs:
                self.block_layout(info.layout, "graph-output", f"reaches graph output '{name}'")
            if name in self.ix.subgraph_reads:
                self.block_layout(info.layout, "subgraph", f"'{name}' is read inside a subgraph")

    # ------------------------------------------------------------------ helpers for rules

    def name(self, i: int) -> str:
        return self.ix.key(i)

    def new_space(self, size: int, node: int, tensor: str) -> int:
        sid = self.classes.add(size)
        self.spaces.append(Space(sid, size, node, tensor))
        return sid

    def set_info(self, name: str, info: ChannelInfo) -> None:
        if name:
            self.info[name] = info

    def block_space(self, sid: int, kind: str, detail: str) -> None:
        self.classes.block(sid, SkipReason(kind, detail))

    def block_layout(self, layout: Layout, kind: str, detail: str) -> None:
        for sid in layout_spaces(layout):
            self.block_space(sid, kind, detail)

    def block_inputs(self, ins: Sequence[ChannelInfo | None], kind: str, detail: str) -> None:
        for info in ins:
            if info is not None:
                self.block_layout(info.layout, kind, detail)

    def slice_const(self, node: int, input: int, axis: int, layout: Layout, role: str) -> None:
        self.edits.append(SliceConst(node, input, axis, layout, role))

    def edit(self, edit: Edit) -> None:
        self.edits.append(edit)

    def unify(self, a: Layout, b: Layout, node: int) -> bool:
        """Require two layouts of one axis to lose the same channels; False (and blocked) if
        they cannot."""
        op = self.ix.nodes[node].op_type
        why = f"{op} '{self.name(node)}' combines channel ranges that cannot be pruned alike"
        if boundaries(a) != boundaries(b):
            self.block_layout(a, "mismatch", why)
            self.block_layout(b, "mismatch", why)
            return False
        ok = True
        for x, y in zip(a, b):
            if x.space is None and y.space is None:
                continue
            if x.space is None or y.space is None or x.inner != y.inner:
                ok = False
            elif (
                x.start == 0
                and y.start == 0
                and x.stop == self.spaces[x.space].size == y.stop == self.spaces[y.space].size
            ):
                self.classes.merge(x.space, y.space)
            elif not (
                self.classes.find(x.space) == self.classes.find(y.space)
                and self.spaces[x.space].size == self.spaces[y.space].size
                and (x.start, x.stop) == (y.start, y.stop)
            ):
                ok = False
        if not ok:
            self.block_layout(a, "mismatch", why)
            self.block_layout(b, "mismatch", why)
        return ok

    def couple(self, space_in: int, space_out: int, groups: int) -> None:
        """A grouped conv: its input and output lose the same groups."""
        self.classes.merge(space_in, space_out, groups=groups)

    def dim(self, name: str, axis: int) -> int | None:
        """Static size of ``name`` along ``axis`` (negative counts from the end), or None."""
        value = self.ix.const(name)
        if value is not None:
            shape: list[Any] | None = list(value.shape)
        else:
            shape = self.ix.shapes.get(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) else None


def analyze_channels(
    model: onnx.ModelProto, *, input_shapes: dict[str, list[int]] | None = None
) -> ChannelGraph:
    """Find the channel groups of ``model`` and what pruning each of them implies.

    Args:
        model: the model; it is not modified.
        input_shapes: concrete shapes for inputs with dynamic dimensions other than the
            batch (which counts as 1), used for shape inference.

    Returns:
        The :class:`ChannelGraph`; its ``groups`` say which can be pruned, and why not.
    """
    analyzer = Analyzer(GraphIndex(model, input_shapes=input_shapes))
    analyzer.run()
    return ChannelGraph(analyzer)


__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "FilterSource",
    "GammaSource",
    "Seg",
    "SkipReason",
    "analyze_channels",
]
