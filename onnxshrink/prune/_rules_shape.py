"""Channel-analysis rules for ops that move axes around: reshapes, concatenations, splits.

See :mod:`onnxshrink.prune._rules` for what a rule is; this module registers its rules in
the same table when imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx

from onnxshrink.prune._graph import attr
from onnxshrink.prune._layout import (
    ChannelInfo,
    Layout,
    Seg,
    ShapeEntry,
    SliceBounds,
    SplitSizes,
    divide_inner,
    layout_length,
    layout_range,
    scale_inner,
)
from onnxshrink.prune._rules import Infos, first_only, int_list, rule, used

if TYPE_CHECKING:
    from onnxshrink.prune.graph_channels import Analyzer


def regroup(
    dims_in: Sequence[int], dims_out: Sequence[int], axis: int, layout: Layout
) -> tuple[int, Layout] | None:
    """Where a row-major reshape from ``dims_in`` to ``dims_out`` puts channel axis ``axis``.

    The channels survive a reshape when the dims before them keep their product and each
    channel stays one contiguous block: trailing dims merged into the channel axis make each
    channel ``k`` positions wide, and splitting an axis whose channels are each ``k`` wide
    (a Flatten undone) is the inverse. Anything else (a channel shuffle) returns None.
    """
    length = layout_length(layout)
    if dims_in[axis] != length:
        return None
    before, after = math.prod(dims_in[:axis]), math.prod(dims_in[axis + 1 :])
    for o in range(len(dims_out)):
        if axis >= 1 and o == 0:
            continue  # the batch axis stays in front
        if math.prod(dims_out[:o]) != before or dims_out[o] * math.prod(dims_out[o + 1 :]) != length * after:
            continue
        if dims_out[o] % length == 0:
            return o, scale_inner(layout, dims_out[o] // length)
        if length % dims_out[o] == 0:
            divided = divide_inner(layout, length // dims_out[o])
            if divided is not None:
                return o, divided
    return None


@rule("Flatten")
def _flatten(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    dims = a.ix.shape(node.input[0])
    if dims is None:
        a.block_layout(x.layout, "reshape", f"Flatten '{a.name(i)}' has an input of unknown shape")
        return
    split = int(attr(node, "axis", 1)) % (len(dims) + 1) if dims else 0
    out = [math.prod(dims[:split]), math.prod(dims[split:])]
    mapped = regroup(dims, out, x.axis, x.layout)
    if mapped is None:
        a.block_layout(x.layout, "reshape", f"Flatten '{a.name(i)}' mixes the channel axis with others")
        return
    a.set_info(node.output[0], ChannelInfo(mapped[0], 2, mapped[1]))


@rule("Reshape")
def _reshape(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    name = a.name(i)
    target = a.ix.const(node.input[1])
    dims_in, dims_out = a.ix.shape(node.input[0]), a.ix.shape(node.output[0])
    if target is None or dims_in is None or dims_out is None:
        a.block_layout(x.layout, "reshape", f"Reshape '{name}' has a computed or unknown target shape")
        return
    mapped = regroup(dims_in, dims_out, x.axis, x.layout)
    if mapped is None:
        a.block_layout(
            x.layout, "reshape", f"Reshape '{name}' splits or mixes the channel axis (channel shuffle?)"
        )
        return
    o, layout = mapped
    spec = [int(v) for v in target.reshape(-1)]
    allow_zero = int(attr(node, "allowzero", 0))
    copies_channels = any(v == 0 and j == x.axis and j != o for j, v in enumerate(spec))
    keeps_axis = o == x.axis and layout == x.layout
    if (allow_zero and 0 in spec) or copies_channels or (spec[o] == 0 and not keeps_axis):
        a.block_layout(x.layout, "reshape", f"Reshape '{name}' copies the channel count with a 0 entry")
        return
    if spec[o] > 0:
        a.edit(ShapeEntry(i, 1, o, layout))
    a.set_info(node.output[0], ChannelInfo(o, len(dims_out), layout))


@rule("Transpose")
def _transpose(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    perm = attr(node, "perm")
    perm = list(range(x.rank))[::-1] if perm is None else [int(p) for p in perm]
    a.set_info(node.output[0], ChannelInfo(perm.index(x.axis), x.rank, x.layout))


@rule("Squeeze", "Unsqueeze")
def _squeeze(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    ok, axes = int_list(a, node, "axes", 1)
    name = a.name(i)
    if node.op_type == "Squeeze" and ok and axes is None:
        dims = a.ix.shape(node.input[0])
        axes = [k for k, d in enumerate(dims) if d == 1] if dims is not None else None
    if not ok or axes is None:
        a.block_layout(x.layout, "unsupported-op", f"{node.op_type} '{name}' has unknown axes")
        return
    if node.op_type == "Squeeze":
        normal = {v % x.rank for v in axes}
        if x.axis in normal:
            a.block_layout(x.layout, "unsupported-op", f"Squeeze '{name}' removes the channel axis")
            return
        shift = sum(1 for v in normal if v < x.axis)
        a.set_info(node.output[0], ChannelInfo(x.axis - shift, x.rank - len(normal), x.layout))
        return
    rank = x.rank + len(axes)
    inserted = {v % rank for v in axes}
    kept = [p for p in range(rank) if p not in inserted]
    a.set_info(node.output[0], ChannelInfo(kept[x.axis], rank, x.layout))


@rule("Concat")
def _concat(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    infos = [x for x in ins if x is not None]
    name = a.name(i)
    rank = infos[0].rank
    axis = int(attr(node, "axis", 0)) % rank
    if any(x.rank != rank for x in infos):
        a.block_inputs(ins, "mismatch", f"Concat '{name}' joins tensors of different ranks")
        return
    if all(x.axis == axis for x in infos):
        segs: list[Seg] = []
        for x, n in zip(ins, node.input):
            if x is not None:
                segs += x.layout
                continue
            size = a.dim(n, axis)
            if size is None:
                a.block_inputs(ins, "unsupported-op", f"Concat '{name}' joins '{n}' of unknown size")
                return
            if size:
                segs.append(Seg(None, 0, size))
        a.set_info(node.output[0], ChannelInfo(axis, rank, tuple(segs)))
        return
    channel_axis = infos[0].axis
    if any(x.axis != channel_axis for x in infos) or channel_axis == axis:
        a.block_inputs(ins, "mismatch", f"Concat '{name}' joins channels on different axes")
        return
    layout = infos[0].layout
    for x in infos[1:]:
        a.unify(layout, x.layout, i)
    length = layout_length(layout)
    for j, (x, n) in enumerate(zip(ins, node.input)):
        if x is None:
            if a.dim(n, channel_axis) == length and a.ix.const(n) is not None:
                a.slice_const(i, j, channel_axis, layout, "operand:Concat")
            else:
                a.block_layout(
                    layout,
                    "mismatch",
                    f"Concat '{name}' joins the channels with '{n}', which cannot be pruned",
                )
    a.set_info(node.output[0], ChannelInfo(channel_axis, rank, layout))


@rule("Split")
def _split(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    name = a.name(i)
    axis = int(attr(node, "axis", 0)) % x.rank
    if axis != x.axis:
        for out in node.output:
            a.set_info(out, x)
        return
    length = layout_length(x.layout)
    ok, sizes = int_list(a, node, "split", 1)
    if not ok:
        a.block_layout(x.layout, "unsupported-op", f"Split '{name}' has computed sizes")
        return
    if sizes is None:
        parts = int(attr(node, "num_outputs", len(node.output)))
        step = -(-length // parts)
        sizes = [step] * (parts - 1) + [length - step * (parts - 1)]
    layouts: list[Layout] = []
    pos = 0
    for size in sizes:
        piece = layout_range(x.layout, pos, pos + size)
        if piece is None:
            a.block_layout(x.layout, "unsupported-op", f"Split '{name}' cuts a flattened channel apart")
            return
        layouts.append(piece)
        pos += size
    if pos != length or len(layouts) != len(node.output):
        a.block_layout(x.layout, "unsupported-op", f"Split '{name}' sizes do not match its input")
        return
    a.edit(SplitSizes(i, tuple(layouts)))
    for out, piece in zip(node.output, layouts):
        a.set_info(out, ChannelInfo(axis, x.rank, piece))


@rule("Slice")
def _slice(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    name = a.name(i)
    consts = [a.ix.const(n) if n else None for n in list(node.input[1:5]) + [""] * (4 - len(node.input[1:5]))]
    starts, ends, axes_c, steps_c = consts
    given_axes = len(node.input) > 3 and bool(node.input[3])
    given_steps = len(node.input) > 4 and bool(node.input[4])
    if (
        a.ix.opset < 10
        or starts is None
        or ends is None
        or (given_axes and axes_c is None)
        or (given_steps and steps_c is None)
    ):
        a.block_layout(x.layout, "unsupported-op", f"Slice '{name}' has computed bounds")
        return
    count = len(starts.reshape(-1))
    axes = [int(v) % x.rank for v in axes_c.reshape(-1)] if axes_c is not None else list(range(count))
    if x.axis not in axes:
        a.set_info(node.output[0], x)
        return
    k = axes.index(x.axis)
    step = int(steps_c.reshape(-1)[k]) if steps_c is not None else 1
    length = layout_length(x.layout)
    begin, end = (int(v.reshape(-1)[k]) for v in (starts, ends))
    begin, end = (min(max(v + length if v < 0 else v, 0), length) for v in (begin, end))
    out = layout_range(x.layout, begin, end) if step == 1 and begin < end else None
    prefix = layout_range(x.layout, 0, begin)
    if out is None or prefix is None:
        a.block_layout(
            x.layout, "unsupported-op", f"Slice '{name}' takes channels with a step or cuts one apart"
        )
        return
    a.edit(SliceBounds(i, k, prefix, out))
    a.set_info(node.output[0], ChannelInfo(x.axis, x.rank, out))


@rule("Shape")
def _shape(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    """Reading the shape is harmless unless someone uses the channel count."""
    x = ins[0]
    if x is None:
        return
    start, end = int(attr(node, "start", 0)), int(attr(node, "end", x.rank))
    start, end = (min(max(v + x.rank if v < 0 else v, 0), x.rank) for v in (start, end))
    if not start <= x.axis < end:
        return
    position = x.axis - start
    why = f"the channel count of '{node.input[0]}' is read at run time by Shape '{a.name(i)}'"
    if node.output[0] in a.ix.graph_outputs:
        a.block_layout(x.layout, "shape-read", why)
        return
    for k, j in a.ix.consumers.get(node.output[0], []):
        user = a.ix.nodes[k]
        indices = a.ix.const(user.input[1]) if user.op_type == "Gather" and j == 0 else None
        if indices is not None and int(attr(user, "axis", 0)) == 0:
            width = end - start
            if position not in {int(v) % width for v in indices.reshape(-1)}:
                continue
        a.block_layout(x.layout, "shape-read", why)
        return


@rule("LayerNormalization")
def _layer_norm(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    axis = int(attr(node, "axis", -1)) % x.rank
    if x.axis >= axis or any(used(a, out) for out in node.output[1:]):
        a.block_layout(
            x.layout, "layernorm", f"LayerNormalization '{a.name(i)}' normalizes over the channel axis"
        )
        return
    a.set_info(node.output[0], x)


@rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    new = a.ix.opset >= 13
    axis = int(attr(node, "axis", -1 if new else 1)) % x.rank
    if (new and x.axis == axis) or (not new and x.axis >= axis):
        a.block_layout(
            x.layout, "unsupported-op", f"{node.op_type} '{a.name(i)}' normalizes over the channel axis"
        )
        return
    a.set_info(node.output[0], x)
