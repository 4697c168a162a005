"""Static int8 quantization (QDQ) that is fast on the target provider and keeps accuracy."""

from onnxshrink.quantize.config import DEFAULT_OP_TYPES, Int8Config
from onnxshrink.quantize.pipeline import Int8Result, quantize_int8

__all__ = ["DEFAULT_OP_TYPES", "Int8Config", "Int8Result", "quantize_int8"]
