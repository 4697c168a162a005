"""onnxshrink: make trained ONNX models smaller and faster after training, and prove it."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxshrink.errors import ShrinkError  # noqa: E402
from onnxshrink.modelio import load_model, save_model  # noqa: E402

__all__ = ["ShrinkError", "__version__", "load_model", "save_model"]
