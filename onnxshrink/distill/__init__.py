"""Distillation fine-tuning of ONNX models through PyTorch: recover what pruning and int8 cost.

The teacher (usually the fp32 model) runs in onnxruntime; the student (the pruned and/or
quantized model) runs as a :class:`TorchGraph`, an ``nn.Module`` interpreting its ONNX graph,
and is trained to match the teacher; :meth:`TorchGraph.export` writes the trained weights back
into the student's graph. No original training code is needed.

torch is an optional extra (``pip install 'onnxshrink[train]'``). Importing this package
without it raises :class:`TorchNotInstalledError`, a :class:`~onnxshrink.errors.ShrinkError`.
"""

from __future__ import annotations

from onnxshrink.errors import ShrinkError


class TorchNotInstalledError(ShrinkError):
    """Distillation needs PyTorch, which is not installed."""


try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    raise TorchNotInstalledError(
        "distillation needs PyTorch, which is not installed: pip install 'onnxshrink[train]'"
    ) from None

from onnxshrink.distill.graph import GraphExecutionError, TorchGraph
from onnxshrink.distill.hook import DistillationHook, LossTerms
from onnxshrink.distill.loop import DistillResult, distill
from onnxshrink.distill.ops import NodeInfo, UnsupportedOpError, register, supported_ops

__all__ = [
    "DistillResult",
    "DistillationHook",
    "GraphExecutionError",
    "LossTerms",
    "NodeInfo",
    "TorchGraph",
    "TorchNotInstalledError",
    "UnsupportedOpError",
    "distill",
    "register",
    "supported_ops",
]
