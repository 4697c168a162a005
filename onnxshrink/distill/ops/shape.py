"""Ops that move, select or create data: shapes, slicing, padding, resizing, casting.

Shape-valued inputs (``Reshape``'s shape, ``Slice``'s starts, ...) are read as Python ints:
the graph runs eagerly, so dynamic shapes work exactly as in onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onnxshrink.distill.ops._registry import (
    TORCH_DTYPES,
    NodeInfo,
    ints,
    norm_axis,
    register,
    tensor_like,
    to_torch,
)

_INT64_MAX = 2**63 - 1


@register("Identity")
def identity(node: NodeInfo, x: Tensor) -> Tensor:
    return x


@register("Constant")
def constant(node: NodeInfo) -> Tensor:
    return to_torch(constant_value(node))


def constant_value(node: NodeInfo) -> np.ndarray:
    """The value a ``Constant`` node holds."""
    kinds = {
        "value": None,
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in kinds.items():
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    raise node.unsupported(f"a Constant holding {sorted(node.attrs)}")


@register("ConstantOfShape")
def constant_of_shape(node: NodeInfo, shape: Tensor) -> Tensor:
    value = node.get("value")
    fill = to_torch(np.asarray(value).reshape(-1)[:1]) if value is not None else torch.zeros(1)
    return torch.full(ints(shape), fill.item(), dtype=fill.dtype, device=shape.device)


@register("Cast")
def cast(node: NodeInfo, x: Tensor) -> Tensor:
    to = int(node.get("to"))
    if to not in TORCH_DTYPES:
        raise node.unsupported(f"Cast to ONNX type {to}")
    return x.to(TORCH_DTYPES[to])


@register("CastLike")
def cast_like(node: NodeInfo, x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


@register("Shape")
def shape(node: NodeInfo, x: Tensor) -> Tensor:
    dims = list(x.shape)
    start, end = node.get("start", 0), node.get("end", len(dims))
    return tensor_like(dims[slice(start, end)], x, torch.int64)


@register("Size")
def size(node: NodeInfo, x: Tensor) -> Tensor:
    return tensor_like(x.numel(), x, torch.int64)


@register("Reshape")
def reshape(node: NodeInfo, x: Tensor, shape: Tensor) -> Tensor:
    dims = ints(shape)
    if not node.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register("Flatten")
def flatten(node: NodeInfo, x: Tensor) -> Tensor:
    axis = norm_axis(int(node.get("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def transpose(node: NodeInfo, x: Tensor) -> Tensor:
    perm = node.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@register("Squeeze")
def squeeze(node: NodeInfo, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = ints(axes) if node.opset >= 13 else list(node.get("axes", []))
    if not dims:
        return x.reshape([d for d in x.shape if d != 1])
    keep = {norm_axis(a, x.dim()) for a in dims}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in keep])


@register("Unsqueeze")
def unsqueeze(node: NodeInfo, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = ints(axes) if node.opset >= 13 else list(node.get("axes", []))
    rank = x.dim() + len(dims)
    for axis in sorted(norm_axis(a, rank) for a in dims):
        x = x.unsqueeze(axis)
    return x


@register("Concat")
def concat(node: NodeInfo, *xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=int(node.get("axis")))


@register("Split")
def split(node: NodeInfo, x: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, ...]:
    axis = norm_axis(int(node.get("axis", 0)), x.dim())
    parts = ints(sizes) if node.opset >= 13 else list(node.get("split", []))
    if not parts:
        count = int(node.get("num_outputs", len(node.outputs)))
        chunk = -(-x.shape[axis] // count)
        parts = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
    return tuple(torch.split(x, parts, dim=axis))


@register("Slice")
def slice_(
    node: NodeInfo,
    x: Tensor,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    axes: Tensor | None = None,
    steps: Tensor | None = None,
) -> Tensor:
    if node.opset < 10:
        begin, stop = list(node.get("starts")), list(node.get("ends"))
        dims = list(node.get("axes", range(len(begin))))
        strides = [1] * len(begin)
    else:
        begin, stop = ints(starts), ints(ends)
        dims = ints(axes) if axes is not None else list(range(len(begin)))
        strides = ints(steps) if steps is not None else [1] * len(begin)
    for axis, start, end, step in zip(dims, begin, stop, strides):
        axis = norm_axis(axis, x.dim())
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:  # torch slicing has no negative steps
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            x = x.index_select(axis, torch.arange(start, end, step, device=x.device))
    return x


@register("Gather")
def gather(node: NodeInfo, x: Tensor, indices: Tensor) -> Tensor:
    axis = norm_axis(int(node.get("axis", 0)), x.dim())
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape([*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]])


@register("GatherElements")
def gather_elements(node: NodeInfo, x: Tensor, indices: Tensor) -> Tensor:
    axis = norm_axis(int(node.get("axis", 0)), x.dim())
    idx = indices.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@register("Expand")
def expand(node: NodeInfo, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))


@register("Tile")
def tile(node: NodeInfo, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(*ints(repeats))


@register("Range")
def range_(node: NodeInfo, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@register("Pad")
def pad(
    node: NodeInfo,
    x: Tensor,
    pads: Tensor | None = None,
    value: Tensor | None = None,
    axes: Tensor | None = None,
) -> Tensor:
    if node.opset < 11:
        amounts, fill = list(node.get("pads")), float(node.get("value", 0.0))
    else:
        amounts, fill = ints(pads), (value.item() if value is not None and value.numel() else 0)
    dims = [norm_axis(a, x.dim()) for a in ints(axes)] if axes is not None else list(range(x.dim()))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(dims):
        begin[axis], end[axis] = amounts[i], amounts[i + len(dims)]
    padded = [i for i in range(x.dim()) if begin[i] or end[i]]
    if not padded:
        return x
    torch_pads: list[int] = []
    for axis in range(x.dim() - 1, min(padded) - 1, -1):
        torch_pads += [begin[axis], end[axis]]
    mode = node.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise node.unsupported(f"Pad mode {mode!r}")
    # torch pads the last 1-3 axes this way, with one or two leading (batch, channel) axes.
    lead = min(padded)
    if lead not in (1, 2) or x.dim() - lead > 3:
        raise node.unsupported(f"Pad mode {mode!r} on axes {padded} of a rank-{x.dim()} tensor")
    return F.pad(x, torch_pads, mode=torch_mode)


# --------------------------------------------------------------------------- Resize


def _source_coords(mode: str, n_out: int, n_in: int, scale: float, device: torch.device) -> Tensor:
    """Input coordinate of each output position (float32, as onnxruntime computes it)."""
    x = torch.arange(n_out, dtype=torch.float32, device=device)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if n_out > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise ValueError(mode)


_ROUNDING: dict[str, Callable[[Tensor], Tensor]] = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


@register("Resize")
def resize(
    node: NodeInfo,
    x: Tensor,
    roi: Tensor | None = None,
    scales: Tensor | None = None,
    sizes: Tensor | None = None,
) -> Tensor:
    if node.opset < 11:
        raise node.unsupported("Resize before opset 11")
    mode = node.get("mode", "nearest")
    coord_mode = node.get("coordinate_transformation_mode", "half_pixel")
    nearest_mode = node.get("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise node.unsupported(f"Resize mode {mode!r}")
    if coord_mode == "tf_crop_and_resize" or nearest_mode not in _ROUNDING:
        raise node.unsupported(
            f"coordinate_transformation_mode={coord_mode!r}, nearest_mode={nearest_mode!r}"
        )
    if node.get("antialias", 0) or node.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise node.unsupported("antialias / keep_aspect_ratio_policy")
    axes = [norm_axis(a, x.dim()) for a in node.get("axes", range(x.dim()))]
    if sizes is not None and sizes.numel():
        out_sizes = ints(sizes)
        factors = [o / x.shape[a] for a, o in zip(axes, out_sizes)]
    else:
        factors = [float(s) for s in scales.reshape(-1).tolist()] if scales is not None else []
        out_sizes = [math.floor(x.shape[a] * s) for a, s in zip(axes, factors)]
    for axis, n_out, scale in zip(axes, out_sizes, factors):
        n_in = x.shape[axis]
        if n_out == n_in and scale == 1.0:
            continue
        coords = _source_coords(coord_mode, n_out, n_in, scale, x.device)
        if mode == "nearest":
            index = _ROUNDING[nearest_mode](coords).clamp(0, n_in - 1).long()
            x = x.index_select(axis, index)
            continue
        coords = coords.clamp(0, n_in - 1)
        low = coords.floor().long()
        high = (low + 1).clamp(max=n_in - 1)
        shape = [1] * x.dim()
        shape[axis] = n_out
        weight = (coords - low.to(coords.dtype)).to(x.dtype).reshape(shape)
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x
