"""Per-op rules of the channel analysis: how each op carries, couples or blocks channels.

A rule receives the analyzer, the node's index, the node, and the channel info of each of
its inputs (None for inputs that carry no prunable channels). It sets the info of the
node's outputs, records edits, and blocks whatever it cannot handle exactly. An op without
a rule blocks every space that reaches it; outputs of a blocked op carry no channel info,
which is safe because their inputs are then never pruned.

Shape-moving ops (Flatten, Reshape, Transpose, Squeeze/Unsqueeze, Concat, Split, Slice,
Shape) are in :mod:`onnxshrink.prune._rules_shape`, which adds to the same table.

The rules follow the ONNX operator specs (opsets 11 to 23); where an op's behaviour depends
on the opset (Softmax's axis, attributes that became inputs) both forms are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxshrink.prune._graph import attr
from onnxshrink.prune._layout import (
    ChannelInfo,
    FilterSource,
    GammaSource,
    Layout,
    MacTerm,
    Seg,
    SetGroups,
    ShapeEntry,
    layout_length,
)

if TYPE_CHECKING:
    from onnxshrink.prune.graph_channels import Analyzer

Infos = Sequence[ChannelInfo | None]
Rule = Callable[["Analyzer", int, onnx.NodeProto, Infos], None]
RULES: dict[str, Rule] = {}
#: Ops that create a channel space even when no input carries channels.
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def first_only(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> ChannelInfo | None:
    """Input 0's channel info; channels on any other input block everything."""
    if any(x is not None for x in ins[1:]):
        a.block_inputs(
            ins, "unsupported-op", f"{node.op_type} '{a.name(i)}' takes channels on an unexpected input"
        )
        return None
    return ins[0] if ins else None


def used(a: Analyzer, name: str) -> bool:
    return bool(name) and (bool(a.ix.consumers.get(name)) or name in a.ix.graph_outputs)


def int_list(
    a: Analyzer, node: onnx.NodeProto, attr_name: str, input_index: int
) -> tuple[bool, list[int] | None]:
    """An ints attribute, or the same values given as a constant input (newer opsets).

    Returns (ok, values): ok is False when the input is given but not constant.
    """
    value = attr(node, attr_name)
    if value is not None:
        return True, [int(v) for v in value]
    if len(node.input) > input_index and node.input[input_index]:
        values = const_ints(a, node.input[input_index])
        return values is not None, values
    return True, None


def const_ints(a: Analyzer, name: str) -> list[int] | None:
    value = a.ix.const(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _full(a: Analyzer, seg: Seg) -> bool:
    return seg.space is not None and seg.start == 0 and seg.stop == a.spaces[seg.space].size


def _blocked_output(
    a: Analyzer, i: int, node: onnx.NodeProto, axis: int, rank: int, kind: str, detail: str
) -> None:
    """Give a producer we cannot prune a blocked space, so the report lists it."""
    size = a.dim(node.output[0], axis)
    if size:
        sid = a.new_space(size, i, node.output[0])
        a.block_space(sid, kind, detail)
        a.set_info(node.output[0], ChannelInfo(axis, rank, (Seg(sid, 0, size),)))


# --------------------------------------------------------------------------- producers


@rule("Conv")
def _conv(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = ins[0]
    w = a.ix.const(node.input[1])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    name = a.name(i)
    if any(ins[1:]) or w is None or w.ndim < 3:
        why = f"weight of Conv '{name}' is not a constant initializer"
        a.block_inputs(ins, "non-constant-weight", why)
        _blocked_output(
            a, i, node, 1, x.rank if x else (w.ndim if w is not None else 4), "non-constant-weight", why
        )
        return
    group = int(attr(node, "group", 1))
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    sid = a.new_space(cout, i, node.output[0])
    out: Layout = (Seg(sid, 0, cout),)
    a.set_info(node.output[0], ChannelInfo(1, w.ndim, out))
    a.slice_const(i, 1, 0, out, "producer-weight")
    a.filters.append(FilterSource(sid, i, 1, 0))
    if has_bias:
        if a.ix.const(node.input[2]) is None:
            a.block_space(sid, "non-constant-weight", f"bias of Conv '{name}' is not a constant initializer")
        a.slice_const(i, 2, 0, out, "producer-bias")
    if group == 1:
        inputs: Layout | None = None
        if x is not None:
            if x.axis != 1 or x.rank != w.ndim:
                a.block_layout(
                    x.layout, "unsupported-op", f"Conv '{name}' receives channels on axis {x.axis}"
                )
            else:
                a.slice_const(i, 1, 1, x.layout, "consumer-weight")
                inputs = x.layout
        a.mac_terms.append(MacTerm(i, inputs, out))
        return
    a.mac_terms.append(MacTerm(i, None, out))
    seg = x.layout[0] if x is not None and len(x.layout) == 1 else None
    if (
        x is None
        or seg is None
        or x.axis != 1
        or seg.inner != 1
        or not _full(a, seg)
        or seg.channels != group * cin_g
        or cout % group
    ):
        why = f"grouped Conv '{name}' (groups={group}) cannot keep its group structure"
        if x is None:
            why += ": its input channels cannot be pruned"
        elif seg is None or not _full(a, seg):
            why += ": its input is a concatenation or a slice"
        a.block_space(sid, "grouped-conv", why)
        a.block_inputs(ins, "grouped-conv", why)
        return
    assert seg.space is not None
    a.couple(seg.space, sid, group)
    a.edit(SetGroups(i, sid, group))


@rule("ConvTranspose")
def _conv_transpose(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = ins[0]
    w = a.ix.const(node.input[1])
    name = a.name(i)
    group = int(attr(node, "group", 1))
    if any(ins[1:]) or w is None or w.ndim < 3 or group != 1:
        kind = "grouped-conv" if w is not None and group != 1 else "non-constant-weight"
        why = (
            f"grouped ConvTranspose '{name}' (groups={group}) is not supported"
            if kind == "grouped-conv"
            else f"weight of ConvTranspose '{name}' is not a constant initializer"
        )
        a.block_inputs(ins, kind, why)
        _blocked_output(a, i, node, 1, x.rank if x else 4, kind, why)
        return
    cout = int(w.shape[1])
    sid = a.new_space(cout, i, node.output[0])
    out: Layout = (Seg(sid, 0, cout),)
    a.set_info(node.output[0], ChannelInfo(1, w.ndim, out))
    a.slice_const(i, 1, 1, out, "producer-weight")
    a.filters.append(FilterSource(sid, i, 1, 1))
    if len(node.input) > 2 and node.input[2]:
        if a.ix.const(node.input[2]) is None:
            a.block_space(sid, "non-constant-weight", f"bias of ConvTranspose '{name}' is not constant")
        a.slice_const(i, 2, 0, out, "producer-bias")
    inputs: Layout | None = None
    if x is not None:
        if x.axis != 1 or x.rank != w.ndim:
            a.block_layout(
                x.layout, "unsupported-op", f"ConvTranspose '{name}' receives channels on axis {x.axis}"
            )
        else:
            a.slice_const(i, 1, 0, x.layout, "consumer-weight")
            inputs = x.layout
    a.mac_terms.append(MacTerm(i, inputs, out))


@rule("Gemm")
def _gemm(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = ins[0]
    name = a.name(i)
    b = a.ix.const(node.input[1])
    if any(ins[1:]) or b is None or b.ndim != 2:
        why = f"weight of Gemm '{name}' is not a constant 2-D initializer"
        a.block_inputs(ins, "non-constant-weight", why)
        _blocked_output(a, i, node, 1, 2, "non-constant-weight", why)
        return
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    w_out = 0 if trans_b else 1
    n_out = int(b.shape[w_out])
    sid = a.new_space(n_out, i, node.output[0])
    out: Layout = (Seg(sid, 0, n_out),)
    a.set_info(node.output[0], ChannelInfo(1, 2, out))
    a.slice_const(i, 1, w_out, out, "producer-weight")
    a.filters.append(FilterSource(sid, i, 1, w_out))
    if len(node.input) > 2 and node.input[2]:
        c = a.ix.const(node.input[2])
        if c is None:
            a.block_space(sid, "non-constant-weight", f"bias of Gemm '{name}' is not constant")
        elif c.ndim >= 1 and c.shape[-1] == n_out and n_out > 1:
            a.slice_const(i, 2, c.ndim - 1, out, "producer-bias")
        elif c.ndim >= 1 and c.shape[-1] != 1:
            a.block_space(sid, "unsupported-op", f"bias of Gemm '{name}' does not broadcast over its outputs")
    inputs: Layout | None = None
    if x is not None:
        if x.rank != 2 or x.axis != (0 if trans_a else 1):
            a.block_layout(x.layout, "unsupported-op", f"Gemm '{name}' receives channels on its row axis")
        else:
            a.slice_const(i, 1, 1 - w_out, x.layout, "consumer-weight")
            inputs = x.layout
    a.mac_terms.append(MacTerm(i, inputs, out))


@rule("MatMul")
def _matmul(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = ins[0]
    name = a.name(i)
    w = a.ix.const(node.input[1])
    rank_a = x.rank if x is not None else a.ix.rank(node.input[0])
    if ins[1] is not None or w is None or w.ndim != 2 or rank_a is None:
        why = f"MatMul '{name}' has no constant 2-D weight"
        a.block_inputs(ins, "non-constant-weight", why)
        return
    n_out = int(w.shape[1])
    rank = max(rank_a, 2) if rank_a >= 2 else 1
    sid = a.new_space(n_out, i, node.output[0])
    out: Layout = (Seg(sid, 0, n_out),)
    a.set_info(node.output[0], ChannelInfo(rank - 1, rank, out))
    a.slice_const(i, 1, 1, out, "producer-weight")
    a.filters.append(FilterSource(sid, i, 1, 1))
    inputs: Layout | None = None
    if x is not None:
        if x.axis != x.rank - 1:
            a.block_layout(
                x.layout, "unsupported-op", f"MatMul '{name}' receives channels on a non-reduced axis"
            )
        else:
            a.slice_const(i, 1, 0, x.layout, "consumer-weight")
            inputs = x.layout
    a.mac_terms.append(MacTerm(i, inputs, out))


# --------------------------------------------------------------------------- per-channel ops


@rule("BatchNormalization", "InstanceNormalization")
def _norm(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    name = a.name(i)
    count = 4 if node.op_type == "BatchNormalization" else 2
    length = layout_length(x.layout)
    params = [a.ix.const(n) for n in node.input[1 : 1 + count]]
    if x.axis != 1:
        a.block_layout(
            x.layout, "unsupported-op", f"{node.op_type} '{name}' normalizes axis 1, channels are on {x.axis}"
        )
        return
    if len(params) != count or any(p is None or p.shape != (length,) for p in params):
        a.block_layout(
            x.layout, "non-constant-weight", f"parameters of {node.op_type} '{name}' are not constant"
        )
    else:
        for j, role in enumerate(("norm-scale", "norm-bias", "norm-mean", "norm-var")[:count], start=1):
            a.slice_const(i, j, 0, x.layout, role)
        offset = 0
        for seg in x.layout:
            if seg.space is not None and seg.inner == 1 and _full(a, seg):
                a.gammas.append(GammaSource(seg.space, i, 1, offset))
            offset += seg.length
    if any(used(a, out) for out in node.output[1:]):
        a.block_layout(x.layout, "unsupported-op", f"{node.op_type} '{name}' uses its training outputs")
    a.set_info(node.output[0], x)


UNARY = (
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu",
    "Gelu", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Shrink", "Abs",
    "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "Identity", "Dropout", "Cast", "CastLike", "IsNaN", "IsInf", "Not",
)  # fmt: skip


@rule(*UNARY)
def _unary(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    if node.op_type == "CastLike":  # the second input only gives the type
        ins = ins[:1]
    x = first_only(a, i, node, ins)
    if x is not None:
        for out in node.output:  # Dropout's mask has the input's shape
            a.set_info(out, x)


ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
)  # fmt: skip


@rule(*ELEMENTWISE)
def _elementwise(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    """Broadcasting ops: every operand with channels loses the same ones; a constant operand
    that spans the channel axis is sliced; any other full-width operand blocks."""
    name = a.name(i)
    ranks = [x.rank if x is not None else a.ix.rank(n) for x, n in zip(ins, node.input)]
    infos = [x for x in ins if x is not None]
    if any(r is None for r in ranks):
        a.block_inputs(ins, "unsupported-op", f"{node.op_type} '{name}' has an operand of unknown rank")
        return
    out_rank = max(r for r in ranks if r is not None)
    axes = {x.axis + out_rank - x.rank for x in infos}
    if len(axes) != 1:
        a.block_inputs(ins, "mismatch", f"{node.op_type} '{name}' combines channels on different axes")
        return
    axis = axes.pop()
    layout = infos[0].layout
    for other in infos[1:]:
        a.unify(layout, other.layout, i)
    length = layout_length(layout)
    for j, (x, n) in enumerate(zip(ins, node.input)):
        rank = ranks[j]
        if x is not None or not n or rank is None:
            continue
        k = axis - (out_rank - rank)
        if k < 0:
            continue
        size = a.dim(n, k)
        if size == 1:
            continue
        if size == length and a.ix.const(n) is not None:
            a.slice_const(i, j, k, layout, f"operand:{node.op_type}")
            continue
        a.block_layout(
            layout,
            "mismatch",
            f"{node.op_type} '{name}' combines the channels with '{n}', which cannot be pruned",
        )
    a.set_info(node.output[0], ChannelInfo(axis, out_rank, layout))


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    if x.axis != 1:
        a.block_layout(
            x.layout, "unsupported-op", f"{node.op_type} '{a.name(i)}' pools over the channel axis {x.axis}"
        )
        return
    if len(node.output) > 1 and used(a, node.output[1]):
        a.block_layout(
            x.layout, "unsupported-op", f"MaxPool '{a.name(i)}' indices depend on the channel count"
        )
    a.set_info(node.output[0], x)


@rule("Resize", "Upsample")
def _resize(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    name = a.name(i)
    axes = attr(node, "axes")
    position: int | None = x.axis
    if axes is not None:
        normal = [int(v) % x.rank for v in axes]
        position = normal.index(x.axis) if x.axis in normal else None
    mode = attr(node, "coordinate_transformation_mode", b"")
    if mode == b"tf_crop_and_resize":
        a.block_layout(x.layout, "unsupported-op", f"Resize '{name}' crops (tf_crop_and_resize)")
        return
    if node.op_type == "Upsample":
        scales_name, sizes_name = (node.input[1] if len(node.input) > 1 else ""), ""
    else:
        scales_name = (
            node.input[2]
            if len(node.input) > 2 and a.ix.opset >= 11
            else (node.input[1] if len(node.input) > 1 else "")
        )
        sizes_name = node.input[3] if len(node.input) > 3 else ""
    sizes = a.ix.const(sizes_name) if sizes_name else None
    scales = a.ix.const(scales_name) if scales_name else None
    if scales is None and node.op_type == "Upsample" and attr(node, "scales") is not None:
        scales = np.asarray(attr(node, "scales"), dtype=np.float32)
    if sizes is not None and sizes.size:
        if position is not None:
            a.edit(ShapeEntry(i, 3, position, x.layout))
    elif scales is not None and scales.size:
        if position is not None and float(scales.reshape(-1)[position]) != 1.0:
            a.block_layout(x.layout, "unsupported-op", f"{node.op_type} '{name}' scales the channel axis")
            return
    else:
        a.block_layout(x.layout, "unsupported-op", f"{node.op_type} '{name}' has computed scales or sizes")
        return
    a.set_info(node.output[0], x)


@rule("Pad")
def _pad(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    ok, pads = int_list(a, node, "pads", 1)
    axes = const_ints(a, node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(x.rank))
    if not ok or axes is None or pads is None:
        a.block_layout(x.layout, "unsupported-op", f"Pad '{a.name(i)}' has computed pads")
        return
    normal = [v % x.rank for v in axes]
    if x.axis in normal:
        k = normal.index(x.axis)
        if pads[k] != 0 or pads[k + len(normal)] != 0:
            a.block_layout(x.layout, "unsupported-op", f"Pad '{a.name(i)}' pads the channel axis")
            return
    a.set_info(node.output[0], x)


REDUCE = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)  # fmt: skip


@rule(*REDUCE)
def _reduce(a: Analyzer, i: int, node: onnx.NodeProto, ins: Infos) -> None:
    x = first_only(a, i, node, ins)
    if x is None:
        return
    ok, axes = int_list(a, node, "axes", 1)
    name = a.name(i)
    if not ok:
        a.block_layout(x.layout, "unsupported-op", f"{node.op_type} '{name}' has computed axes")
        return
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            a.set_info(node.output[0], x)
        else:
            a.block_layout(
                x.layout, "reduce", f"{node.op_type} '{name}' reduces over every axis, channels included"
            )
        return
    normal = {v % x.rank for v in axes}
    if x.axis in normal:
        a.block_layout(x.layout, "reduce", f"{node.op_type} '{name}' reduces over the channel axis")
        return
    if int(attr(node, "keepdims", 1)):
        a.set_info(node.output[0], x)
    else:
        shift = sum(1 for v in normal if v < x.axis)
        a.set_info(node.output[0], ChannelInfo(x.axis - shift, x.rank - len(normal), x.layout))
