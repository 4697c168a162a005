"""Elementwise maths, comparisons and reductions (numpy broadcasting, as ONNX and torch agree).

Only ``Add`` and ``Mul`` treat a non-scalar float initializer as a weight (biases added after
a ``MatMul``, layer scales); ``Sub``/``Div`` operands are usually input normalisation
constants and stay fixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from onnxshrink.distill.ops._registry import NONSCALAR, NodeInfo, ints, register

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "Log": torch.log,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Round": torch.round,  # half to even, as ONNX specifies
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Sqrt": torch.sqrt,
}

_COMPARE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Equal": torch.eq,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


def _unary(node: NodeInfo, x: Tensor) -> Tensor:
    return _UNARY[node.op_type](x)


def _compare(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return _COMPARE[node.op_type](a, b)


register(*_UNARY)(_unary)
register(*_COMPARE)(_compare)


@register("Add", weights=NONSCALAR)
def add(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return a + b


@register("Sub")
def sub(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return a - b


@register("Mul", weights=NONSCALAR)
def mul(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return a * b


@register("Div")
def div(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C integer division, as onnxruntime


@register("Pow")
def pow_(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)


@register("Mod")
def mod(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return torch.fmod(a, b) if node.get("fmod", 0) else torch.remainder(a, b)


@register("Clip")
def clip(node: NodeInfo, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    if node.opset < 11:
        lo, hi = node.get("min"), node.get("max")
        return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))
    return torch.clamp(x, low, high)


@register("Where")
def where(node: NodeInfo, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(cond.bool(), a, b)


def _fold(fn: Callable[[Tensor, Tensor], Tensor], tensors: tuple[Tensor, ...]) -> Tensor:
    return functools.reduce(fn, tensors)


@register("Max")
def max_(node: NodeInfo, *xs: Tensor) -> Tensor:
    return _fold(torch.maximum, xs)


@register("Min")
def min_(node: NodeInfo, *xs: Tensor) -> Tensor:
    return _fold(torch.minimum, xs)


@register("Sum")
def sum_(node: NodeInfo, *xs: Tensor) -> Tensor:
    return _fold(torch.add, xs)


@register("Mean")
def mean_(node: NodeInfo, *xs: Tensor) -> Tensor:
    return _fold(torch.add, xs) / len(xs)


# --------------------------------------------------------------------------- reductions

#: Opset from which each reduction takes ``axes`` as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _reduce_axes(node: NodeInfo, x: Tensor, axes_input: Tensor | None) -> list[int] | None:
    """Axes to reduce (normalised), or ``None`` for "return the input unchanged"."""
    if node.opset >= _AXES_INPUT_SINCE.get(node.op_type, 18):
        axes = ints(axes_input)
    else:
        axes = list(node.get("axes", []))
    if not axes:
        if node.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(x.dim()))
    return sorted(a + x.dim() if a < 0 else a for a in axes)


def _prod(x: Tensor, axes: list[int], keep: bool) -> Tensor:
    for axis in sorted(axes, reverse=True):
        x = torch.prod(x, dim=axis, keepdim=keep)
    return x


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda x, a, k: torch.mean(x, dim=a, keepdim=k),
    "ReduceSum": lambda x, a, k: torch.sum(x, dim=a, keepdim=k),
    "ReduceMax": lambda x, a, k: torch.amax(x, dim=a, keepdim=k),
    "ReduceMin": lambda x, a, k: torch.amin(x, dim=a, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, a, k: torch.sum(torch.abs(x), dim=a, keepdim=k),
    "ReduceL2": lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)),
    "ReduceSumSquare": lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k),
    "ReduceLogSumExp": lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k),
}


@register(*_REDUCERS)
def reduce(node: NodeInfo, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _reduce_axes(node, x, axes)
    if dims is None:
        return x
    return _REDUCERS[node.op_type](x, dims, bool(node.get("keepdims", 1)))


@register("ArgMax", "ArgMin")
def arg_reduce(node: NodeInfo, x: Tensor) -> Tensor:
    axis = int(node.get("axis", 0))
    keep = bool(node.get("keepdims", 1))
    if node.get("select_last_index", 0):
        flipped = torch.flip(x, dims=[axis])
        fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
        return x.shape[axis] - 1 - fn(flipped, dim=axis, keepdim=keep)
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return fn(x, dim=axis, keepdim=keep)
