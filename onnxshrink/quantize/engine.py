"""Static QDQ rewriting with onnxruntime's quantizer as the engine, fed our own ranges.

onnxruntime's ``QDQQuantizer`` knows how each op type takes Q/DQ nodes (weights per channel,
biases in int32, shared scales for Concat/pooling), so we use it for the rewrite itself. What
we add: the activation ranges (from :mod:`onnxshrink.quantize.calibrate`), which nodes to
quantize, the hardware-dependent choices, and a check that no written scale is zero,
negative or non-finite.
"""

from __future__ import annotations

import fnmatch
import logging
import platform
import re
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.errors import ShrinkError
from onnxshrink.passes.cleanup import topological_sort
from onnxshrink.quantize.config import Int8Config

log = logging.getLogger(__name__)


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (u8s8 dot products without saturation); None if unknown."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return None
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags))


def decide_reduce_range(config: Int8Config) -> bool:
    if config.reduce_range is not None:
        return config.reduce_range
    vnni = cpu_has_vnni()
    # x86 without VNNI: u8 x s8 products are summed in int16 pairs and can saturate;
    # 7-bit weights avoid it (onnxruntime's own advice). Elsewhere full range is safe.
    return vnni is False


def matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def excluded_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns)
    return [n.name for n in model.graph.node if n.name and patterns and matches(n.name, patterns)]


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the quantizer and the fusion lint key on names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def build_qdq(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    config: Int8Config,
    *,
    exclude: Iterable[str] = (),
) -> onnx.ModelProto:
    """A QDQ copy of ``model`` with the given activation ranges; ``exclude`` stays fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    work = onnx.ModelProto()
    work.CopyFrom(model)
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()},
    )
    activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
    quantizer = QDQQuantizer(
        work,
        config.per_channel,
        decide_reduce_range(config),
        QuantType.QInt8,
        activation,
        tensors,
        [],  # nodes_to_quantize: all
        sorted(set(exclude)),
        list(config.quantized_op_types),
        {
            "ActivationSymmetric": config.activation_type == "int8",
            "WeightSymmetric": True,
        },
    )
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice through the root logger
    try:
        quantized = quantizer.quantize_model()
    finally:
        root.setLevel(previous)
    topological_sort(quantized.graph)
    check_scales(quantized)
    return quantized


def check_scales(model: onnx.ModelProto) -> None:
    """Refuse to produce a model with a zero, negative or non-finite Q/DQ scale."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        tensor = inits.get(node.input[1])
        if tensor is None:
            continue
        scale = numpy_helper.to_array(tensor).astype(np.float64)
        if scale.size and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ShrinkError(
                f"quantization produced an invalid scale for '{node.input[0]}' "
                f"(min {scale.min():.3g}); the weights or calibration data hold extreme values"
            )
