"""Quantized weights of QDQ models: trained as float parameters, written back as integers.

A weight stored as an integer initializer behind a ``DequantizeLinear`` (the QDQ format of
``onnxruntime.quantization.quantize_static``) becomes a float ``nn.Parameter`` holding its
dequantized value, ``w = (q - zero_point) * scale``. Each forward pass fake-quantizes it again
(rounding with a straight-through estimator), with a scale that follows the weights, and
:meth:`QuantizedWeight.export` writes the same integers and scales back. Three policies:

``symmetric``
    signed weights with all-zero zero points (what onnxruntime writes for int8 weights):
    ``scale = max|w| / qmax`` per channel along the ``DequantizeLinear`` axis (per tensor for
    a scalar scale), ``qmax = 127`` for int8; zero points stay 0. A channel whose weights are
    all zero keeps its old scale.
``bias``
    int32 biases of ``Conv``/``ConvTranspose``/``Gemm``/``BatchNormalization`` whose scale was
    ``input_scale * weight_scale``: the scale is recomputed from the (fixed) activation scale
    and the weight's current scale, so the integer bias stays consistent with the integer
    convolution onnxruntime runs.
``fixed``
    anything else (asymmetric uint8 weights, scales we cannot relate): scale and zero point are
    kept; trained values are rounded and clamped to the original grid.

A weight whose value did not change is written back untouched, bytes included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor

from onnxshrink.distill.ops._registry import NodeInfo, norm_axis
from onnxshrink.distill.ops.quant import fake_quantize, per_axis

Policy = Literal["symmetric", "bias", "fixed"]

#: Ops whose inputs are (activation, weight, bias): the bias scale derives from the other two.
BIAS_OPS = {"Conv", "ConvTranspose", "Gemm", "BatchNormalization"}

_QRANGE = {
    np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
    for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)
}


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` with onnxruntime's broadcasting, in the scale's float type."""

    def shaped(a: np.ndarray) -> np.ndarray:
        if a.size == 1:
            return a.reshape(())
        shape = [1] * q.ndim
        shape[norm_axis(axis, q.ndim)] = -1
        return a.reshape(shape)

    centred = q.astype(np.int64)
    if zero_point is not None:
        centred = centred - shaped(zero_point).astype(np.int64)
    return (centred.astype(scale.dtype) * shaped(scale)).astype(scale.dtype)


def is_quantized_weight(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, node: NodeInfo
) -> bool:
    """Whether a ``DequantizeLinear`` of this constant can be trained as a float parameter."""
    if q.dtype not in _QRANGE or not np.issubdtype(scale.dtype, np.floating) or node.get("block_size", 0):
        return False
    if zero_point is not None and (zero_point.dtype != q.dtype or zero_point.size != scale.size):
        return False
    if scale.size == 1:
        return True
    axis = norm_axis(int(node.get("axis", 1)), q.ndim)
    return 0 <= axis < q.ndim and q.shape[axis] == scale.size


@dataclass
class QuantizedWeight:
    """One integer weight behind a ``DequantizeLinear``, trained as the float parameter ``name``.

    Attributes:
        node: the ``DequantizeLinear`` node.
        name: the integer initializer (also the ONNX name of the float parameter).
        scale_name, zero_point_name: the node's scale and zero-point initializers.
        policy: how scales follow the weights (see the module docstring).
        input_scale: ``bias`` policy: the activation scale feeding the consumer.
        partner: ``bias`` policy: the consumer's quantized weight.
    """

    node: NodeInfo
    name: str
    scale_name: str
    zero_point_name: str | None
    scale: np.ndarray
    zero_point: np.ndarray | None
    qdtype: np.dtype
    policy: Policy = "fixed"
    input_scale: str | None = None
    partner: QuantizedWeight | None = None

    def __post_init__(self) -> None:
        # Own, writable copies: torch shares memory with them when building scale tensors.
        self.scale = np.array(self.scale, copy=True)
        self.zero_point = None if self.zero_point is None else np.array(self.zero_point, copy=True)

    @property
    def axis(self) -> int:
        return int(self.node.get("axis", 1))

    @property
    def qrange(self) -> tuple[int, int]:
        lo, hi = _QRANGE[self.qdtype]
        if self.policy == "symmetric":
            return -hi, hi  # onnxruntime's symmetric int8 range is [-127, 127]
        return lo, hi

    def initial_value(self, q: np.ndarray) -> np.ndarray:
        return dequantize(q, self.scale, self.zero_point, self.axis)

    # ----------------------------------------------------------------- forward

    def current_scale(
        self, w: Tensor, values: dict[str, Tensor], unchanged: frozenset[str] = frozenset()
    ) -> Tensor:
        """The scale the weights ``w`` quantize with (detached, shaped like the stored scale).

        ``unchanged`` names weights still at their loaded values: on export they keep their
        stored scale bit for bit, and biases derive from it.
        """
        old = torch.as_tensor(self.scale, device=w.device).to(w.dtype)
        if self.policy == "fixed" or self.name in unchanged and self.policy == "symmetric":
            return old
        if self.policy == "bias":
            if self.partner is None or self.input_scale is None:  # set together by choose_policy
                raise RuntimeError(f"bias '{self.name}' has no weight or input scale")
            w_scale = self.partner.current_scale(values[self.partner.name], values, unchanged)
            return (values[self.input_scale].detach().to(w.dtype).reshape(()) * w_scale).reshape(
                self.scale.shape
            )
        w = w.detach()
        if self.scale.size == 1:
            amax = w.abs().amax().reshape(self.scale.shape)
        else:
            axis = norm_axis(self.axis, w.dim())
            amax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
        return torch.where(amax > 0, amax / self.qrange[1], old)

    def _zero_point(self, w: Tensor) -> Tensor | float:
        if self.zero_point is None or self.policy != "fixed":
            return 0.0
        zp = torch.as_tensor(self.zero_point.astype(np.float64), device=w.device).to(w.dtype)
        return per_axis(zp, w.dim(), self.axis)

    def forward(self, values: dict[str, Tensor]) -> Tensor:
        """The fake-quantized weight the consumer sees (replaces the ``DequantizeLinear``)."""
        w = values[self.name]
        scale = per_axis(self.current_scale(w, values), w.dim(), self.axis)
        zp = self._zero_point(w)
        return (fake_quantize(w, scale, zp, *self.qrange) - zp) * scale

    # ----------------------------------------------------------------- export

    def quantize(
        self, w: Tensor, values: dict[str, Tensor], unchanged: frozenset[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(integers, scale) to store for the float weights ``w``."""
        with torch.no_grad():
            scale = self.current_scale(w, values, unchanged)
            q = fake_quantize(w, per_axis(scale, w.dim(), self.axis), self._zero_point(w), *self.qrange)
        return q.cpu().numpy().astype(self.qdtype), scale.cpu().numpy().astype(self.scale.dtype)

    def needs_export(self, unchanged: frozenset[str]) -> bool:
        if self.name not in unchanged:
            return True
        return self.policy == "bias" and self.partner is not None and self.partner.name not in unchanged

    def write(
        self,
        model: onnx.ModelProto,
        w: Tensor,
        values: dict[str, Tensor],
        unchanged: frozenset[str],
        tensors: dict[str, onnx.TensorProto],
    ) -> None:
        """Store ``w`` into ``model`` as integers, with a new scale when it changed."""
        q, scale = self.quantize(w, values, unchanged)
        tensors[self.name].CopyFrom(numpy_helper.from_array(q, self.name))
        if not np.array_equal(scale, self.scale):
            _write_scale(model, self, scale, tensors)


def _write_scale(
    model: onnx.ModelProto, qw: QuantizedWeight, scale: np.ndarray, tensors: dict[str, onnx.TensorProto]
) -> None:
    """Write the new scale, under a fresh name when other nodes share the old initializer."""
    users = sum(1 for n in model.graph.node for i in n.input if i == qw.scale_name)
    name = qw.scale_name
    if users > 1:
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        base = f"{qw.scale_name}_distilled"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        node = next(n for n in model.graph.node if n.output and n.output[0] == qw.node.outputs[0])
        node.input[1] = name
        model.graph.initializer.append(numpy_helper.from_array(scale.reshape(qw.scale.shape), name))
        tensors[name] = model.graph.initializer[-1]
        return
    tensors[name].CopyFrom(numpy_helper.from_array(scale.reshape(qw.scale.shape), name))


def choose_policy(
    qw: QuantizedWeight,
    q: np.ndarray,
    consumer: NodeInfo | None,
    position: int,
    partner: QuantizedWeight | None,
    input_scale: tuple[str, np.ndarray] | None,
) -> None:
    """Set ``qw.policy`` (and its partner/input scale for biases) from how the weight is used.

    ``q`` is the stored integer weight: one that uses the type's most negative value (-128)
    was not quantized symmetrically, and keeps its scale.
    """
    zero = qw.zero_point is None or not np.any(qw.zero_point)
    if (
        qw.qdtype == np.int32
        and consumer is not None
        and consumer.op_type in BIAS_OPS
        and position == 2
        and partner is not None
        and partner.policy == "symmetric"
        and input_scale is not None
        and input_scale[1].size == 1
        and zero
    ):
        expected = input_scale[1].reshape(()).astype(np.float64) * partner.scale.astype(np.float64)
        if expected.size == qw.scale.size and np.allclose(
            expected.reshape(-1), qw.scale.reshape(-1), rtol=1e-5, atol=0
        ):
            qw.policy, qw.partner, qw.input_scale = "bias", partner, input_scale[0]
            return
    if qw.qdtype in (np.int8, np.int16) and zero and (q.size == 0 or q.min() > _QRANGE[qw.qdtype][0]):
        qw.policy = "symmetric"
