"""The op registry and the ops TorchGraph can run (importing this registers them all)."""

from __future__ import annotations

from onnxshrink.distill.ops import elementwise, nn, quant, shape  # noqa: F401 - registers the ops
from onnxshrink.distill.ops._registry import (
    NONSCALAR,
    OPS,
    NodeInfo,
    OpDef,
    UnsupportedOpError,
    register,
    supported_ops,
)

__all__ = ["NONSCALAR", "OPS", "NodeInfo", "OpDef", "UnsupportedOpError", "register", "supported_ops"]
