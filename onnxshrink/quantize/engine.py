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
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.errors import ShrinkError
from onnxshrink.passes.cleanup import cleanup, topological_sort
from onnxshrink.quantize.config import Int8Config
from onnxshrink.quantize.rewrites import shapes_from_quantized
from onnxshrink.stats import weightless_copy

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

    work = onnx.ModelProto()
    work.CopyFrom(model)
    _attach_inferred_types(work)
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()},
    )
    activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
    quantizer_class = _quantizer_class()
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice through the root logger
    try:
        quantized = _run_quantizer(quantizer_class, work, tensors, activation, config, exclude)
    except ShrinkError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer asserts and indexes freely
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ShrinkError(f"onnxruntime's quantizer failed on this model ({type(exc).__name__}: {first[:200]})") from exc
    finally:
        root.setLevel(previous)
    _drop_metadata(quantized, _INFERRED_KEY)
    topological_sort(quantized.graph)
    if shapes_from_quantized(quantized):
        cleanup(quantized)  # the DequantizeLinear nodes only a Shape read
    check_scales(quantized)
    return quantized


def _run_quantizer(
    quantizer_class: type, work: onnx.ModelProto, tensors: Any, activation: Any, config: Int8Config, exclude: Iterable[str]
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType

    quantizer = quantizer_class(
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
    return quantizer.quantize_model()  # rewrites ``work`` in place


#: The metadata entry by which onnxruntime's quantizer knows a model's types are inferred.
_INFERRED_KEY = "onnx.infer"


def _attach_inferred_types(model: onnx.ModelProto) -> None:
    """Give ``model`` the inferred value types that onnxruntime's quantizer needs.

    Left to itself, the quantizer deep-copies the model, saves it to a temporary folder and
    loads it back to infer shapes: two more copies of the weights at once. Inference on a
    weightless copy gives the same types.
    """
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    _drop_metadata(model, _INFERRED_KEY)
    entry = model.metadata_props.add()
    entry.key, entry.value = _INFERRED_KEY, "onnxruntime.quant"


def _drop_metadata(model: onnx.ModelProto, key: str) -> None:
    kept = [p for p in model.metadata_props if p.key != key]
    if len(kept) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(kept)


def symmetric_per_channel_params(
    weight: np.ndarray, axis: int, qmin: np.ndarray, qmax: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Zero points and scales of symmetric per-channel quantization along ``axis``.

    The same arithmetic as onnxruntime's ``compute_scale_zp`` (float64 range, float32
    scale, scale 1 for an all-zero channel), for all channels at once.
    """
    channels = weight.shape[axis]
    flat = np.moveaxis(weight, axis, 0).reshape(channels, -1)
    absmax = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(channels, weight.dtype)
    scale = (2.0 * absmax.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    degenerate = scale < np.finfo(weight.dtype).tiny
    middle = np.round((np.float64(qmin) + np.float64(qmax)) / 2.0)
    zero_point = np.where(degenerate, 0, middle).astype(np.asarray(qmin).dtype)
    return zero_point, np.where(degenerate, 1.0, scale).astype(weight.dtype)


def quantize_per_channel_initializer(
    weight: onnx.TensorProto, quant_type: int, zero_point: np.ndarray, scale: np.ndarray, axis: int | None = None,
    quant_weight_name: str | None = None, block_size: int = 0,
) -> onnx.TensorProto | None:
    """onnxruntime's ``quantize_onnx_initializer`` for per-channel 8-bit weights, all channels
    at once; ``None`` for any other case.

    The same float32 arithmetic as onnxruntime's per-channel loop (divide by the channel's
    scale, round half to even, add the zero point, clip), so the bytes are identical.
    """
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, get_qmin_qmax_for_qType

    if (
        axis is None or block_size or weight.data_type != onnx.TensorProto.FLOAT
        or quant_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    ):
        return None
    data = numpy_helper.to_array(weight)
    axis = axis + data.ndim if axis < 0 else axis
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if not 0 <= axis < data.ndim or scale.dtype != np.float32 or scale.shape != (data.shape[axis],) or zero_point.shape != scale.shape:
        return None
    shape = [1] * data.ndim
    shape[axis] = data.shape[axis]
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    q = np.divide(data.astype(np.float32, copy=False), scale.reshape(shape)).round()
    q += zero_point.reshape(shape)
    np.clip(q, qmin, qmax, out=q)
    name = quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
    return numpy_helper.from_array(q.astype(onnx.helper.tensor_dtype_to_np_dtype(quant_type)).reshape(tuple(weight.dims)), name)


def first_by_name(name: str, items: Iterable[Any]) -> Any:
    """onnxruntime's ``find_by_name`` (the first item so named, or None), stopping at the
    first match instead of listing every match (it runs over all initializers per lookup)."""
    return next((item for item in items if item.name == name), None)


class ByName:
    """:func:`first_by_name` through an index of each protobuf repeated field it is asked about.

    onnxruntime's quantizer looks initializers up by name thousands of times, each lookup a
    scan of them all (0.33 s of DenseNet-121's 1.3 s QDQ build). The quantizer appends to and
    removes from the field as it goes: the index takes in items appended since the last call,
    and is rebuilt on any other change to the field (its length, or which item is last, by
    identity); a hit is checked against the item at its position (a removal shifts them). So
    the answer is a scan's, unless an item is renamed or overwritten in place (the quantizer
    names new tensors before adding them).
    """

    def __init__(self) -> None:
        self._indexes: dict[int, tuple[Any, int, Any, dict[str, int]]] = {}

    def find(self, name: str, items: Any) -> Any:
        if not hasattr(items, "add"):  # not a repeated message field: scan
            return first_by_name(name, items)
        count = len(items)
        last = items[count - 1] if count else None
        entry = self._indexes.get(id(items))
        if entry is None or entry[0] is not items:
            entry = self._index(items, count, last)
        elif entry[1] != count or entry[2] is not last:
            known, known_last = entry[1], entry[2]
            if count > known and (known == 0 or items[known - 1] is known_last):
                entry = self._index(items, count, last, entry[3], start=known)  # appended to
            else:
                entry = self._index(items, count, last)
        position = entry[3].get(name)
        if position is not None and items[position].name != name:
            position = self._index(items, count, last)[3].get(name)
        return None if position is None else items[position]

    def _index(
        self, items: Any, count: int, last: Any, positions: dict[str, int] | None = None, start: int = 0
    ) -> tuple[Any, int, Any, dict[str, int]]:
        positions = {} if positions is None else positions
        for i in range(start, count):
            positions.setdefault(items[i].name, i)
        # The field and its last item are kept: their ids cannot then be reused.
        entry = self._indexes[id(items)] = (items, count, last, positions)
        return entry


def _rename_in_all_nodes(graph: onnx.GraphProto, field: str, old: str, new: str) -> None:
    """Rename ``old`` to ``new`` in every node's ``input`` or ``output`` list; ``in`` on the
    repeated field skips the nodes that do not name it at C speed."""
    for node in graph.node:
        names = getattr(node, field)
        if old in names:
            for j, name in enumerate(names):
                if name == old:
                    names[j] = new


class Readers:
    """Which nodes read each tensor name, kept up to date through the quantizer's renames.

    onnxruntime's quantizer renames each tensor it quantizes in the inputs of every node
    (``replace_input_of_all_nodes``): a scan of all nodes per tensor, quadratic (0.3-0.5 s
    of DenseNet-121's and ConvNeXt-T's QDQ build). This index finds the readers at once. It
    follows the graph: nodes appended since the last call are indexed, any other change to
    the node list (a removal, a re-sort, another graph) rebuilds it; renames done through
    :meth:`rename` and :meth:`rename_in` keep it right; a listed node is always checked
    before it is changed. What it relies on: in QDQ mode the quantizer changes node inputs
    only through these methods (checked: identical output to onnxruntime's own, tested).
    """

    def __init__(self, graph_of: Any) -> None:
        self._graph_of = graph_of
        self._graph: Any = None
        self._readers: dict[str, list[Any]] = {}
        self._count = 0
        self._last: Any = None

    def _sync(self) -> None:
        graph = self._graph_of()
        nodes = graph.node
        count = len(nodes)
        if graph is self._graph and count == self._count and (count == 0 or nodes[count - 1] is self._last):
            return
        start = self._count
        if graph is not self._graph or count < start or (start and nodes[start - 1] is not self._last):
            self._readers, start = {}, 0
        for i in range(start, count):
            node = nodes[i]
            for name in node.input:
                if name:
                    self._readers.setdefault(name, []).append(node)
        self._graph, self._count, self._last = graph, count, (nodes[count - 1] if count else None)

    def rename(self, old: str, new: str, only: Collection[str] | None = None) -> None:
        """``old`` -> ``new`` in the inputs of every node reading it (of the nodes named in
        ``only``, if given)."""
        self._sync()
        seen: set[int] = set()
        for node in self._readers.get(old, []):
            if id(node) in seen or (only is not None and node.name not in only):
                continue
            seen.add(id(node))
            self.rename_in(node, old, new)

    def rename_in(self, node: Any, old: str, new: str) -> None:
        """``old`` -> ``new`` in the inputs of ``node``."""
        names = node.input
        if old in names:
            for j, name in enumerate(names):
                if name == old:
                    names[j] = new
            self._readers.setdefault(new, []).append(node)


def _quantizer_class() -> type:
    """onnxruntime's QDQQuantizer, with per-channel weights scaled and quantized vectorised.

    onnxruntime computes scales and quantizes weights channel by channel in Python (about
    1 s and 0.4 s on ResNet-50); the result is identical (tested). Anything unusual
    (overrides, blocks, float16, a minimum range) goes to onnxruntime's own code.
    """
    from onnxruntime.quantization import base_quantizer, onnx_model, qdq_quantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer, QDQQuantTensorType
    from onnxruntime.quantization.base_quantizer import QuantizationParams
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    class VectorisedWeightsQDQQuantizer(QDQQuantizer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            wrapper = self.model  # onnxruntime's ONNXModel; its .model may be swapped, so look it up per call

            # onnxruntime's versions test every input (output) of every node in Python, once
            # for each tensor they rewire (quadratic: 0.2 s on RegNet-Y-400MF).
            readers = Readers(lambda: wrapper.model.graph)

            def replace_input_of_all_nodes(old: str, new: str) -> None:
                readers.rename(old, new)

            def replace_input_of_nodes(old: str, new: str, names: Collection[str]) -> None:
                readers.rename(old, new, only=names)

            def replace_node_input(node: onnx.NodeProto, old: str, new: str) -> None:
                readers.rename_in(node, old, new)

            def replace_output_of_all_nodes(old: str, new: str) -> None:
                _rename_in_all_nodes(wrapper.model.graph, "output", old, new)

            # onnxruntime's re-checks every initializer already there at each call
            # (quadratic), for float8 NaN patterns; this quantizer never makes float8.
            def initializer_extend(inits: list[onnx.TensorProto]) -> None:
                if len(inits) == 0:
                    raise ValueError("Can add an empty list.")
                wrapper.model.graph.initializer.extend(inits)

            self._by_name = ByName()

            def get_initializer(name: str) -> onnx.TensorProto | None:
                return self._by_name.find(name, wrapper.model.graph.initializer)

            wrapper.replace_input_of_all_nodes = replace_input_of_all_nodes
            wrapper.replace_input_of_nodes = replace_input_of_nodes
            wrapper.replace_node_input = replace_node_input
            wrapper.initializer_extend = initializer_extend
            wrapper.replace_output_of_all_nodes = replace_output_of_all_nodes
            wrapper.get_initializer = get_initializer

        def quantize_model(self) -> onnx.ModelProto:
            # onnxruntime calls these module-level functions by name; swapping them for the
            # duration is the only hook. A concurrent quantizer sees either version, and
            # both give the same result.
            original = qdq_quantizer.quantize_onnx_initializer

            def quantize_initializer(*args: Any, **kwargs: Any) -> onnx.TensorProto:
                fast = quantize_per_channel_initializer(*args, **kwargs)
                return fast if fast is not None else original(*args, **kwargs)

            swaps = [(qdq_quantizer, "quantize_onnx_initializer", quantize_initializer)]
            swaps += [(module, "find_by_name", self._by_name.find) for module in (qdq_quantizer, base_quantizer, onnx_model)]
            saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
            for module, name, replacement in swaps:
                setattr(module, name, replacement)
            try:
                return super().quantize_model()
            finally:
                for module, name, previous in saved:
                    setattr(module, name, previous)

        def adjust_tensor_ranges(self) -> None:
            # onnxruntime rebuilds the tensor -> readers map for every Relu and Clip it looks
            # at (quadratic); this method changes ranges only, never the graph: one map serves.
            wrapper = self.model
            readers = wrapper.input_name_to_nodes()
            wrapper.input_name_to_nodes = lambda: readers
            try:
                super().adjust_tensor_ranges()
            finally:
                del wrapper.input_name_to_nodes  # the class's method again

        def _adjust_weight_scale_for_int32_bias(
            self, input_scale: np.ndarray, weight_scale: np.ndarray, weight_name: str, bias_tp: onnx.TensorProto, is_per_channel: bool
        ) -> tuple[bool, np.ndarray | None]:
            # onnxruntime checks, channel by channel in Python, whether input scale x weight
            # scale is too small for the int32 bias (then it widens the weight's scale). A
            # vectorised screen, with a margin far above rounding, finds the channels that
            # might be; none (the usual case): nothing to adjust, as onnxruntime would find.
            if is_per_channel and weight_scale.ndim == 1 and weight_scale.size and np.asarray(input_scale).size == 1:
                bias = numpy_helper.to_array(bias_tp).astype(np.float64)
                if bias.ndim == 1 and bias.shape[0] >= weight_scale.shape[0]:
                    qrange = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
                    smallest = 1.0001 * 2.0 * np.abs(bias[: weight_scale.shape[0]]) / qrange
                    candidate = float(np.asarray(input_scale).item()) * weight_scale.astype(np.float64)
                    if not np.any((candidate > 0.0) & (candidate < smallest * (1.0 + 1e-5))):
                        return False, weight_scale
            return super()._adjust_weight_scale_for_int32_bias(input_scale, weight_scale, weight_name, bias_tp, is_per_channel)

        def _calc_initializer_quant_params(self) -> dict[str, Any]:
            initializers = {t.name: t for t in self.model.initializer()}
            fast = {
                name: (initializers[name], info.axis)
                for name, info in self.tensors_to_quantize.items()
                if name in initializers
                and info.tensor_type is QDQQuantTensorType.WEIGHT
                and info.axis is not None
                and initializers[name].data_type == onnx.TensorProto.FLOAT
                and getattr(self, "block_size", 0) == 0
                and getattr(self, "min_real_range", None) is None
                and not self.tensor_quant_overrides.get(name)
            }
            everything = self.tensors_to_quantize
            self.tensors_to_quantize = {k: v for k, v in everything.items() if k not in fast}
            try:
                params = super()._calc_initializer_quant_params()
            finally:
                self.tensors_to_quantize = everything
            qmin, qmax = get_qmin_qmax_for_qType(self.weight_qType, self.reduce_range, symmetric=True)
            for name, (tensor, axis) in fast.items():
                weight = numpy_helper.to_array(tensor)
                axis = axis + weight.ndim if axis < 0 else axis
                zero_point, scale = symmetric_per_channel_params(weight, axis, qmin, qmax)
                params[name] = QuantizationParams(zero_point=zero_point, scale=scale, quant_type=self.weight_qType, axis=axis)
            return params

    return VectorisedWeightsQDQQuantizer


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
