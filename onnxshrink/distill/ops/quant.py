"""QuantizeLinear / DequantizeLinear as fake quantization with a straight-through estimator.

``QuantizeLinear`` computes ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and keeps
``q`` in floating point (integer-valued), so that the ``DequantizeLinear`` after it,
``(q - zero_point) * scale``, is differentiable. Rounding passes gradients straight through
(``d round(v) / dv := 1``); clamping passes them only inside ``[qmin, qmax]``. Scales and
zero points of activations are the calibrated constants: they are not trained.

Quantized *weights* (an integer initializer behind a ``DequantizeLinear``) are not run
through these ops: :mod:`onnxshrink.distill.qdq` replaces their ``DequantizeLinear`` with a
float parameter and a fake-quant step whose scale follows the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onnxshrink.distill.ops._registry import NodeInfo, norm_axis, register

#: Integer range of each quantized type torch can hold.
QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-32768, 32767),
    torch.uint16: (0, 65535),
    torch.int32: (-(2**31), 2**31 - 1),
}


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def per_axis(t: Tensor, rank: int, axis: int) -> Tensor:
    """Reshape a per-channel scale/zero point to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * rank
    shape[norm_axis(axis, rank)] = -1
    return t.reshape(shape)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """The integer-valued ``QuantizeLinear`` output, in ``x``'s float type, with STE gradients."""
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def _check(node: NodeInfo) -> None:
    if node.get("block_size", 0):
        raise node.unsupported("blocked quantization (block_size)")


@register("QuantizeLinear")
def quantize_linear(node: NodeInfo, x: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    _check(node)
    qtype = zero_point.dtype if zero_point is not None else torch.uint8
    if qtype not in QRANGE or "output_dtype" in node.attrs:
        raise node.unsupported(f"quantization to {qtype}")
    axis = int(node.get("axis", 1))
    s = per_axis(scale, x.dim(), axis).to(x.dtype)
    zp = per_axis(zero_point, x.dim(), axis).to(x.dtype) if zero_point is not None else 0.0
    return fake_quantize(x, s, zp, *QRANGE[qtype])


@register("DequantizeLinear")
def dequantize_linear(node: NodeInfo, x: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    _check(node)
    axis = int(node.get("axis", 1))
    s = per_axis(scale, x.dim(), axis)
    q = x.to(s.dtype)
    if zero_point is not None:
        q = q - per_axis(zero_point, x.dim(), axis).to(s.dtype)
    return q * s
