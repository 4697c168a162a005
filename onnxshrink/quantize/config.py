"""Options of the int8 quantizer: one frozen dataclass, every field typed and documented."""

from __future__ import annotations

from dataclasses import dataclass

from onnxshrink.errors import ConfigError

METHODS = ("auto", "minmax", "percentile", "mse", "entropy")

#: Op types quantized by default on the CPU provider: those onnxruntime turns into int8
#: kernels or runs on int8 data directly. Whatever the provider then leaves unfused is
#: dropped again by the fusion-aware step (see onnxshrink.fusion).
DEFAULT_OP_TYPES = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool",
    "AveragePool", "MaxPool", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Resize", "Reshape",
    "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """How to quantize to int8 (static QDQ).

    Attributes:
        method: activation range choice: ``minmax``, ``percentile``, ``mse``, ``entropy``, or
            ``auto`` (per-tensor MSE-optimal clipping, which never does worse than minmax in
            the error it minimises).
        percentile: the kept mass for ``percentile``.
        per_channel: one weight scale per output channel (recommended).
        activation_type: ``uint8`` (fast on x86 CPUs: u8s8 kernels) or ``int8``.
        reduce_range: 7-bit weights, avoiding u8s8 saturation on x86 CPUs without VNNI.
            ``None`` decides from this machine's CPU.
        op_types: op types to quantize; ``None`` is :data:`DEFAULT_OP_TYPES`.
        exclude: node-name patterns (fnmatch, or ``re:`` regexes) to keep in fp32.
        fusion_aware: drop quantization from units that the provider leaves unfused.
        max_drop: largest allowed drop in top-1, in points (task accuracy when the data has
            labels, else disagreement with fp32). ``None`` (and no ``min_sqnr``): the default
            target, 1 point of expected accuracy drop (flips weighted by the fp32 model's
            confidence) or an output SQNR of 30 dB.
        min_sqnr: smallest allowed output SQNR in dB (for outputs that are not class scores).
        provider: the execution provider the model is meant for (fusion and timing).
        max_calibration_samples: use at most this many samples for calibration.
        seed: for anything random (sample order is never shuffled).
    """

    method: str = "auto"
    percentile: float = 99.999
    per_channel: bool = True
    activation_type: str = "uint8"
    reduce_range: bool | None = None
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    fusion_aware: bool = True
    max_drop: float | None = None
    min_sqnr: float | None = None
    provider: str = "cpu"
    max_calibration_samples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError("percentile must be in (50, 100]")
        if self.activation_type not in ("uint8", "int8"):
            raise ConfigError("activation type must be uint8 or int8")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 100.0:
            raise ConfigError("--max-drop must be between 0 and 100 points")
        if self.max_drop is not None and self.min_sqnr is not None:
            raise ConfigError("give either --max-drop or --min-sqnr, not both")
        if self.max_calibration_samples < 1:
            raise ConfigError("at least one calibration sample is needed")

    @property
    def quantized_op_types(self) -> tuple[str, ...]:
        return self.op_types if self.op_types is not None else DEFAULT_OP_TYPES
