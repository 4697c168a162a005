"""Fusion lint: what onnxruntime really runs in int8 for a QDQ model, read from its own graph.

A QDQ model is only a promise: ``DequantizeLinear -> Conv -> QuantizeLinear`` is fast only if
the execution provider fuses the unit into an int8 kernel (``QLinearConv``). Units it does not
fuse run in float with extra quantize/dequantize work around them, which is how an "int8"
model ends up slower than fp32. This module asks onnxruntime for its optimised graph (the one
it would execute) and reports

* which ops became int8 kernels and which compute ops were left in float behind a
  ``DequantizeLinear`` (the unfused units, each named);
* Q/DQ pairs that survive as plain elementwise work;
* the fraction of the model's MACs that run in int8 kernels.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxshrink.modelio import load_model
from onnxshrink.runtime import make_session
from onnxshrink.stats import count_macs

#: Ops that compute on 8-bit data (onnxruntime's CPU kernels and contrib ops).
INT8_OPS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
    "QLinearReduceMean", "NhwcQLinearConv", "QLinearConvTranspose", "QAttention", "QEmbedLayerNormalization",
}  # fmt: skip
#: Ops that only move or select data: they run on int8 tensors as they are.
DATA_MOVEMENT_OPS = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Gather", "Concat",
    "MaxPool", "Resize", "Pad", "Identity", "Shape", "Expand", "Tile", "GatherElements", "DepthToSpace",
    "SpaceToDepth", "TopK", "ArgMax", "Where",
}  # fmt: skip
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class UnfusedUnit:
    node: str
    op_type: str
    macs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "macs": self.macs}


@dataclass
class FusionReport:
    """What the provider made of a QDQ model."""

    provider: str
    optimized_ops: dict[str, int]
    int8_kernels: int
    unfused: list[UnfusedUnit] = field(default_factory=list)
    redundant_qdq_pairs: list[str] = field(default_factory=list)  # Q -> DQ left as elementwise work
    remaining_quantize: int = 0
    remaining_dequantize: int = 0
    int8_macs: int | None = None
    total_macs: int | None = None

    @property
    def int8_mac_fraction(self) -> float | None:
        if not self.total_macs or self.int8_macs is None:
            return None
        return self.int8_macs / self.total_macs

    def unfused_by_op_type(self) -> dict[str, int]:
        return dict(Counter(u.op_type for u in self.unfused).most_common())

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "int8_kernels": self.int8_kernels,
            "int8_mac_fraction": self.int8_mac_fraction,
            "int8_macs": self.int8_macs,
            "total_macs": self.total_macs,
            "remaining_quantize_linear": self.remaining_quantize,
            "remaining_dequantize_linear": self.remaining_dequantize,
            "unfused_units": [u.to_json() for u in self.unfused],
            "unfused_by_op_type": self.unfused_by_op_type(),
            "redundant_qdq_pairs": self.redundant_qdq_pairs,
            "optimized_ops": self.optimized_ops,
        }

    def summary(self) -> str:
        """One paragraph a person can act on."""
        frac = self.int8_mac_fraction
        parts = [
            f"{self.int8_kernels} int8 kernels"
            + (f", {100 * frac:.1f}% of MACs in int8" if frac is not None else ""),
        ]
        if self.unfused:
            kinds = ", ".join(f"{op} x{n}" for op, n in self.unfused_by_op_type().items())
            parts.append(f"{len(self.unfused)} units left in float between Q/DQ ({kinds})")
        if self.redundant_qdq_pairs:
            parts.append(f"{len(self.redundant_qdq_pairs)} Q/DQ pairs run as plain elementwise work")
        return "; ".join(parts)


def optimized_graph(model: onnx.ModelProto | str | Path, *, provider: str = "cpu") -> onnx.ModelProto:
    """The graph onnxruntime executes for ``model`` on ``provider`` (extended optimisations:
    all fusions, before the layout changes that cannot be saved)."""
    with tempfile.TemporaryDirectory(prefix="onnxshrink-fusion-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        # Weights go to a side file that is never read: the lint needs the graph alone.
        make_session(
            model, provider=provider, optimization="extended", optimized_model_path=target, threads=1,
            config_entries={
                "session.optimized_model_external_initializers_file_name": "optimized.onnx.data",
                "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            },
        )
        optimized, _ = load_model(target, check=False, lift_constants=False, load_weights=False)
    return optimized


def analyze_fusion(model: onnx.ModelProto, *, provider: str = "cpu", macs_by_node: dict[str, int] | None = None) -> FusionReport:
    """Lint a QDQ ``model`` against what ``provider`` fuses.

    Args:
        model: the quantized (QDQ) model.
        provider: execution provider short name.
        macs_by_node: MACs per node name of ``model``; computed when not given.
    """
    if macs_by_node is None:
        macs_by_node = count_macs(model).by_node
    optimized = optimized_graph(model, provider=provider)
    graph = optimized.graph
    initializers = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    ops = Counter(n.op_type for n in graph.node)
    unfused: dict[str, UnfusedUnit] = {}
    redundant: list[str] = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            for consumer in consumers.get(node.output[0], []):
                if consumer.op_type in _QDQ or consumer.op_type in INT8_OPS:
                    continue
                if consumer.op_type in DATA_MOVEMENT_OPS and node.input[0] in initializers:
                    continue  # constant tensors moved around: folded or negligible
                key = consumer.name or consumer.output[0]
                unfused.setdefault(key, UnfusedUnit(key, consumer.op_type, macs_by_node.get(consumer.name, 0)))
        elif node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            source = producers.get(node.input[0])
            if users and all(u.op_type == "DequantizeLinear" for u in users) and (source is None or source.op_type not in INT8_OPS):
                redundant.append(node.name or node.output[0])
    total = sum(macs_by_node.values()) if macs_by_node else None
    int8 = sum(macs_by_node.get(n.name, 0) for n in graph.node if n.op_type in INT8_OPS) if macs_by_node else None
    return FusionReport(
        provider=provider,
        optimized_ops=dict(ops.most_common()),
        int8_kernels=sum(ops[o] for o in INT8_OPS),
        unfused=sorted(unfused.values(), key=lambda u: -u.macs),
        redundant_qdq_pairs=redundant,
        remaining_quantize=ops["QuantizeLinear"],
        remaining_dequantize=ops["DequantizeLinear"] - sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers),
        int8_macs=int8,
        total_macs=total,
    )
