"""Neural-network ops: convolutions, matrix products, normalisation, pooling, activations.

Padding follows ONNX: ``pads = [x1_begin, x2_begin, ..., x1_end, x2_end]``. Symmetric pads
go to torch's ``padding=``; asymmetric ones (and ``auto_pad=SAME_*``) are applied with
``F.pad`` first, so results match onnxruntime for every combination.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from onnxshrink.distill.ops._registry import NodeInfo, register, tensor_like

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX begin/end pads per spatial axis in F.pad order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _explicit_pads(
    node: NodeInfo, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> tuple[list[int], list[int]]:
    """(begin, end) pads per spatial axis, resolving ``auto_pad``."""
    n = len(kernel)
    auto_pad = node.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad != "NOTSET":
        raise node.unsupported(f"auto_pad={auto_pad!r}")
    pads = list(node.get("pads", [0] * (2 * n)))
    return pads[:n], pads[n:]


def _pad_input(x: Tensor, begin: list[int], end: list[int], value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads are returned for torch's ``padding=``; others are applied here."""
    if begin == end:
        return x, begin
    return F.pad(x, _torch_pad(begin, end), value=value), [0] * len(begin)


# --------------------------------------------------------------------------- conv / matmul


@register("Conv", weights=(1, 2))
def conv(node: NodeInfo, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = x.dim() - 2
    if n not in _CONV:
        raise node.unsupported(f"{n}-D convolution")
    kernel = list(node.get("kernel_shape", w.shape[2:]))
    strides = list(node.get("strides", [1] * n))
    dilations = list(node.get("dilations", [1] * n))
    begin, end = _explicit_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    x, padding = _pad_input(x, begin, end)
    return _CONV[n](x, w, b, strides, padding, dilations, int(node.get("group", 1)))


@register("ConvTranspose", weights=(1, 2))
def conv_transpose(node: NodeInfo, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = x.dim() - 2
    if n not in _CONV_T:
        raise node.unsupported(f"{n}-D transposed convolution")
    groups = int(node.get("group", 1))
    kernel = list(node.get("kernel_shape", w.shape[2:]))
    strides = list(node.get("strides", [1] * n))
    dilations = list(node.get("dilations", [1] * n))
    out_pad = list(node.get("output_padding", [0] * n))
    spatial = list(x.shape[2:])
    full = [
        s * (i - 1) + o + (k - 1) * d + 1
        for s, i, o, k, d in zip(strides, spatial, out_pad, kernel, dilations)
    ]
    auto_pad = node.get("auto_pad", "NOTSET")
    if "output_shape" in node.attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(node.get("output_shape", [i * s for i, s in zip(spatial, strides)]))[-n:]
        totals = [f - t for f, t in zip(full, target)]
        upper = auto_pad != "SAME_LOWER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - bg for t, bg in zip(totals, begin)]
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = list(node.get("pads", [0] * (2 * n)))
        begin, end = pads[:n], pads[n:]
    # Full-size result, then output_padding as zeros at the end, then crop; bias last so
    # that the padded positions carry it too.
    y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
    if any(out_pad):
        y = F.pad(y, _torch_pad([0] * n, out_pad))
    index = [slice(None), slice(None)] + [slice(bg, f - e) for bg, e, f in zip(begin, end, full)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


@register("Gemm", weights=(0, 1, 2))
def gemm(node: NodeInfo, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    if node.get("transA", 0):
        a = a.transpose(0, 1)
    if node.get("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = float(node.get("alpha", 1.0)), float(node.get("beta", 1.0))
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@register("MatMul", weights=(0, 1))
def matmul(node: NodeInfo, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


# --------------------------------------------------------------------------- normalisation


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


@register("BatchNormalization", weights=(1, 2))
def batch_norm(
    node: NodeInfo, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor
) -> Tensor | tuple[Tensor, ...]:
    # Inference semantics always (running statistics), even in opsets with training_mode:
    # fine-tuning a deployed graph must not move its statistics.
    eps = float(node.get("epsilon", 1e-5))
    if x.dim() >= 2 and scale.dim() == 1:
        y = F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    else:  # opset < 9 spatial=0 layouts; rare
        y = (x - mean) / torch.sqrt(var + eps) * scale + bias
    if len(node.outputs) > 1:
        return (y, mean, var)[: len(node.outputs)]
    return y


@register("InstanceNormalization", weights=(1, 2))
def instance_norm(node: NodeInfo, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(node.get("epsilon", 1e-5)))


@register("LayerNormalization", weights=(1, 2))
def layer_norm(
    node: NodeInfo, x: Tensor, scale: Tensor, bias: Tensor | None = None
) -> Tensor | tuple[Tensor, ...]:
    axis = int(node.get("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    shape = list(x.shape[axis:])
    eps = float(node.get("epsilon", 1e-5))
    if len(node.outputs) > 1:
        raise node.unsupported("the Mean/InvStdDev outputs")
    if list(scale.shape) == shape and (bias is None or list(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    y = F.layer_norm(x, shape, None, None, eps) * scale
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- pooling


def _pool_geometry(
    node: NodeInfo, x: Tensor
) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    """(kernel, strides, dilations, pads_begin, pads_end, ceil_extra) per spatial axis.

    ``ceil_extra`` holds the cells ``ceil_mode`` adds after the end pads: windows may cover
    them, but they are never counted as input or padding.
    """
    kernel = list(node.get("kernel_shape"))
    n = len(kernel)
    strides = list(node.get("strides", [1] * n))
    dilations = list(node.get("dilations", [1] * n))
    spatial = list(x.shape[2:])
    begin, end = _explicit_pads(node, spatial, kernel, strides, dilations)
    extra = [0] * n
    if node.get("ceil_mode", 0):
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
            span = size + begin[i] + end[i] - ((k - 1) * d + 1)
            out = -(-span // s) + 1
            if (out - 1) * s >= size + begin[i]:  # the last window must start inside the input
                out -= 1
            extra[i] = max((out - 1) * s - span, 0)
    return kernel, strides, dilations, begin, end, extra


@register("MaxPool")
def max_pool(node: NodeInfo, x: Tensor) -> Tensor:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise node.unsupported("the Indices output")
    n = x.dim() - 2
    kernel, strides, dilations, begin, end, extra = _pool_geometry(node, x)
    end = [e + c for e, c in zip(end, extra)]
    if begin == end and all(2 * b <= (k - 1) * d + 1 for b, k, d in zip(begin, kernel, dilations)):
        return _MAX_POOL[n](x, kernel, strides, begin, dilations)
    return _MAX_POOL[n](F.pad(x, _torch_pad(begin, end), value=-math.inf), kernel, strides, 0, dilations)


@register("AveragePool")
def average_pool(node: NodeInfo, x: Tensor) -> Tensor:
    n = x.dim() - 2
    kernel, strides, dilations, begin, end, extra = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise node.unsupported("AveragePool with dilations")
    include_pad = bool(node.get("count_include_pad", 0))
    if begin == end and not any(extra) and all(2 * b <= k for b, k in zip(begin, kernel)):
        return _AVG_POOL[n](x, kernel, strides, begin, count_include_pad=include_pad)
    # The window sums divided by the number of counted cells: the input's, plus the
    # explicit pads when count_include_pad=1 (never the cells ceil_mode adds).
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    ones = F.pad(ones, _torch_pad(begin, end), value=1.0 if include_pad else 0.0)
    ones = F.pad(ones, _torch_pad([0] * n, extra))
    full_end = [e + c for e, c in zip(end, extra)]
    summed = _AVG_POOL[n](F.pad(x, _torch_pad(begin, full_end)), kernel, strides)
    return summed / _AVG_POOL[n](ones, kernel, strides)


@register("GlobalAveragePool")
def global_average_pool(node: NodeInfo, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(node: NodeInfo, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------- activations


@register("Relu")
def relu(node: NodeInfo, x: Tensor) -> Tensor:
    return F.relu(x)


@register("LeakyRelu")
def leaky_relu(node: NodeInfo, x: Tensor) -> Tensor:
    return F.leaky_relu(x, float(node.get("alpha", 0.01)))


@register("PRelu", weights=(1,))
def prelu(node: NodeInfo, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x >= 0, x, x * slope)


@register("Elu")
def elu(node: NodeInfo, x: Tensor) -> Tensor:
    return F.elu(x, float(node.get("alpha", 1.0)))


@register("Selu")
def selu(node: NodeInfo, x: Tensor) -> Tensor:
    alpha = float(node.get("alpha", 1.67326319217681884765625))
    gamma = float(node.get("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("Sigmoid")
def sigmoid(node: NodeInfo, x: Tensor) -> Tensor:
    return torch.sigmoid(x)


@register("HardSigmoid")
def hard_sigmoid(node: NodeInfo, x: Tensor) -> Tensor:
    return torch.clamp(float(node.get("alpha", 0.2)) * x + float(node.get("beta", 0.5)), 0.0, 1.0)


@register("HardSwish")
def hard_swish(node: NodeInfo, x: Tensor) -> Tensor:
    return F.hardswish(x)


@register("Tanh")
def tanh(node: NodeInfo, x: Tensor) -> Tensor:
    return torch.tanh(x)


@register("Softplus")
def softplus(node: NodeInfo, x: Tensor) -> Tensor:
    return F.softplus(x)


@register("Gelu")
def gelu(node: NodeInfo, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=node.get("approximate", "none"))


def _coerced_2d(node: NodeInfo, x: Tensor, fn: Callable[..., Tensor]) -> Tensor:
    """Softmax before opset 13: flatten to 2-D at ``axis`` (default 1) and normalise rows."""
    axis = int(node.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return fn(flat, dim=1).reshape(x.shape)


@register("Softmax")
def softmax(node: NodeInfo, x: Tensor) -> Tensor:
    if node.opset < 13:
        return _coerced_2d(node, x, torch.softmax)
    return torch.softmax(x, dim=int(node.get("axis", -1)))


@register("LogSoftmax")
def log_softmax(node: NodeInfo, x: Tensor) -> Tensor:
    if node.opset < 13:
        return _coerced_2d(node, x, torch.log_softmax)
    return torch.log_softmax(x, dim=int(node.get("axis", -1)))


@register("Dropout")
def dropout(
    node: NodeInfo, x: Tensor, ratio: Tensor | None = None, training: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    # Always inference semantics: distillation fine-tunes the deployed graph.
    if len(node.outputs) > 1 and node.outputs[1]:
        return x, tensor_like(True, x, torch.bool).expand(x.shape)
    return x
