"""Channel spaces, coupling classes and tensor layouts: the vocabulary of the channel analysis.

A **space** is the set of output channels one producer (a Conv, Gemm, MatMul with constant
weights) creates. Spaces that must lose the same channels (the inputs of an ``Add``, a
depthwise conv's input and output) are merged into one **class** with a union-find; a class
is what the report calls a *group*.

A class is pruned in **units**. Normally a unit is one channel. A grouped convolution with
``g`` groups can only lose whole groups, so it merges its input and output classes with
``units = gcd(units_in, units_out, g)``: each member space of ``n`` channels is then cut in
``units`` contiguous blocks of ``n / units`` channels, and a unit is kept or removed in every
member at once. Coarsening with the gcd keeps every earlier constraint, because a
contiguous block structure refines any coarser one that divides it.

A **layout** says what the channel axis of a tensor holds: a sequence of segments, each a
range of one space's channels (a ``Concat`` output holds several), or a range of *fixed*
channels (``space is None``) that come from something we cannot prune, such as a graph
input. After a ``Flatten`` each channel spans ``inner`` consecutive positions of the axis
(``C x H x W`` features), which a following Gemm's weight columns are sliced by.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SkipReason:
    """Why a group is left alone: a short ``kind`` for tallies and a sentence for people."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class Seg:
    """Channels ``[start, stop)`` of ``space`` (None: fixed channels), each ``inner`` wide."""

    space: int | None
    start: int
    stop: int
    inner: int = 1

    @property
    def channels(self) -> int:
        return self.stop - self.start

    @property
    def length(self) -> int:
        return self.channels * self.inner


Layout = tuple[Seg, ...]


def layout_length(layout: Layout) -> int:
    return sum(s.length for s in layout)


def layout_spaces(layout: Layout) -> Iterator[int]:
    for s in layout:
        if s.space is not None:
            yield s.space


def boundaries(layout: Layout) -> list[int]:
    out, pos = [], 0
    for s in layout:
        pos += s.length
        out.append(pos)
    return out


def scale_inner(layout: Layout, factor: int) -> Layout:
    """Every channel spans ``factor`` times as many positions (trailing dims merged in)."""
    return tuple(Seg(s.space, s.start, s.stop, s.inner * factor) for s in layout)


def divide_inner(layout: Layout, factor: int) -> Layout | None:
    """The inverse of :func:`scale_inner`, or None when a channel would be cut apart."""
    if any(s.inner % factor for s in layout):
        return None
    return tuple(Seg(s.space, s.start, s.stop, s.inner // factor) for s in layout)


def layout_range(layout: Layout, begin: int, end: int) -> Layout | None:
    """Positions ``[begin, end)`` of the axis as a layout, or None if a channel is cut."""
    out: list[Seg] = []
    pos = 0
    for s in layout:
        lo, hi = max(begin, pos), min(end, pos + s.length)
        if lo < hi:
            a, b = lo - pos, hi - pos
            if a % s.inner or b % s.inner:
                return None
            out.append(Seg(s.space, s.start + a // s.inner, s.start + b // s.inner, s.inner))
        pos += s.length
    return tuple(out)


@dataclass(frozen=True)
class ChannelInfo:
    """Axis ``axis`` of a rank-``rank`` tensor is laid out as ``layout``."""

    axis: int
    rank: int
    layout: Layout


@dataclass
class Space:
    """The output channels of one producer node."""

    id: int
    size: int
    node: int
    tensor: str


@dataclass
class Classes:
    """Union-find over spaces, with each class's unit count and skip reasons."""

    parent: list[int] = field(default_factory=list)
    units: dict[int, int] = field(default_factory=dict)
    reasons: dict[int, list[SkipReason]] = field(default_factory=dict)

    def add(self, size: int) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.units[sid] = size
        self.reasons[sid] = []
        return sid

    def find(self, sid: int) -> int:
        root = sid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[sid] != root:  # path compression
            self.parent[sid], sid = root, self.parent[sid]
        return root

    def merge(self, a: int, b: int, *, groups: int = 0) -> int:
        """Join the classes of ``a`` and ``b``; ``groups`` further limits the unit count."""
        ra, rb = self.find(a), self.find(b)
        units = math.gcd(self.units[ra], self.units[rb], groups)
        if ra != rb:
            ra, rb = min(ra, rb), max(ra, rb)  # the oldest space names the class
            self.parent[rb] = ra
            self.reasons[ra] += self.reasons.pop(rb)
            del self.units[rb]
        self.units[ra] = units
        return ra

    def block(self, sid: int, reason: SkipReason) -> None:
        root = self.find(sid)
        if reason not in self.reasons[root]:
            self.reasons[root].append(reason)

    def roots(self) -> list[int]:
        return sorted(self.units)


@dataclass(frozen=True)
class FilterSource:
    """Producer weights whose slices along ``axis`` are the filters of ``space``."""

    space: int
    node: int
    input: int
    axis: int


@dataclass(frozen=True)
class GammaSource:
    """A norm scale: entries ``[offset, offset + size)`` of input ``input`` scale ``space``."""

    space: int
    node: int
    input: int
    offset: int


# --------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class SliceConst:
    """Slice constant input ``input`` of node ``node`` along ``axis`` as ``layout`` is kept.

    ``role`` says what the constant is to the channels (``producer-weight``,
    ``producer-bias``, ``consumer-weight``, ``norm-scale``, ``norm-bias``, ``norm-mean``,
    ``norm-var``, ``operand:<op>``).
    """

    node: int
    input: int
    axis: int
    layout: Layout
    role: str


@dataclass(frozen=True)
class SetGroups:
    """A grouped conv keeps ``groups * kept_units / units`` of its ``groups`` groups."""

    node: int
    space: int
    groups: int


@dataclass(frozen=True)
class ShapeEntry:
    """Entry ``position`` of a constant shape-like input (Reshape shape, Resize sizes)
    becomes the pruned length of ``layout``."""

    node: int
    input: int
    position: int
    layout: Layout


@dataclass(frozen=True)
class SplitSizes:
    """A channel-axis Split's sizes become the pruned lengths of its outputs' layouts."""

    node: int
    layouts: tuple[Layout, ...]


@dataclass(frozen=True)
class SliceBounds:
    """A channel-axis Slice (entry ``position`` of starts/ends) keeps ``out`` after
    ``prefix``."""

    node: int
    position: int
    prefix: Layout
    out: Layout


Edit = SliceConst | SetGroups | ShapeEntry | SplitSizes | SliceBounds


def edit_layouts(edit: Edit) -> tuple[Layout, ...]:
    if isinstance(edit, SetGroups):
        return ()
    if isinstance(edit, (SliceConst, ShapeEntry)):
        return (edit.layout,)
    if isinstance(edit, SplitSizes):
        return edit.layouts
    return (edit.prefix, edit.out)


@dataclass(frozen=True)
class MacTerm:
    """A MAC-counted node: its MACs scale with the kept share of these layouts."""

    node: int
    inputs: Layout | None
    outputs: Layout


# --------------------------------------------------------------------------- selections


class Selection:
    """Which units each class keeps; classes not listed keep everything."""

    def __init__(
        self, classes: Classes, spaces: Sequence[Space], kept_units: Mapping[int, Sequence[int]]
    ) -> None:
        self.classes = classes
        self.spaces = spaces
        self.kept_units = {root: tuple(sorted(units)) for root, units in kept_units.items()}
        self._cache: dict[int, np.ndarray | None] = {}

    def kept(self, sid: int) -> np.ndarray | None:
        """Sorted kept channel indices of space ``sid``, or None when all are kept."""
        if sid in self._cache:
            return self._cache[sid]
        root = self.classes.find(sid)
        units = self.kept_units.get(root)
        result: np.ndarray | None = None
        total = self.classes.units[root]
        if units is not None and len(units) < total:
            width = self.spaces[sid].size // total
            base = np.asarray(units, dtype=np.int64)[:, None] * width
            result = (base + np.arange(width, dtype=np.int64)[None, :]).reshape(-1)
        self._cache[sid] = result
        return result

    def seg_kept(self, seg: Seg) -> np.ndarray | None:
        """Kept channels of ``seg`` relative to ``seg.start``, or None when all are kept."""
        if seg.space is None:
            return None
        kept = self.kept(seg.space)
        if kept is None:
            return None
        inside = kept[(kept >= seg.start) & (kept < seg.stop)] - seg.start
        return None if len(inside) == seg.channels else inside

    def indices(self, layout: Layout) -> np.ndarray | None:
        """Kept positions of an axis laid out as ``layout``, or None when all are kept."""
        parts: list[np.ndarray] = []
        changed = False
        pos = 0
        for seg in layout:
            kept = self.seg_kept(seg)
            if kept is None:
                parts.append(np.arange(pos, pos + seg.length, dtype=np.int64))
            else:
                changed = True
                starts = pos + kept * seg.inner
                parts.append((starts[:, None] + np.arange(seg.inner, dtype=np.int64)[None, :]).reshape(-1))
            pos += seg.length
        if not changed:
            return None
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def length(self, layout: Layout) -> int:
        """The length of an axis laid out as ``layout`` after pruning."""
        total = 0
        for seg in layout:
            kept = self.seg_kept(seg)
            total += seg.length if kept is None else len(kept) * seg.inner
        return total
