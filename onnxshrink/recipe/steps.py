"""The steps a recipe is made of: one frozen dataclass per step type, every option typed.

In a recipe file a step is a mapping with ``type`` and its options, flat::

    - type: prune.channels      # ChannelPruneStep: ChannelPruneConfig's options + its own
      ratio: 0.25
      round_to: 4
    - type: quantize.int8       # Int8Step: Int8Config's options
      method: auto

Steps that wrap an existing config (pruning, int8) take that config's options, documented on
:class:`~onnxshrink.prune.ChannelPruneConfig`, :class:`~onnxshrink.prune.MagnitudePruneConfig`
and :class:`~onnxshrink.quantize.Int8Config`, plus the few listed on the step itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from onnxshrink.errors import ConfigError
from onnxshrink.prune import ChannelPruneConfig, MagnitudePruneConfig
from onnxshrink.quantize import Int8Config
from onnxshrink.recipe._codec import build, coerce, did_you_mean, field_hints, plain, to_plain_dict, unknown_keys

#: Marks a field that holds a file path (resolved against the recipe file's folder, left out
#: of the copy of the recipe stamped into output models, which must not depend on paths).
PATH = {"path": True}


def _positive(name: str, value: int | float, *, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if strict else '>= 0'}, not {value}")


@dataclass(frozen=True, kw_only=True)
class FoldStep:
    """``fold``: opset upgrade (to ``min_opset`` if older), constant and BatchNorm folding
    (onnxruntime's basic optimiser), dead-node removal; each change is checked against the
    model on two held-back samples and dropped if it moves the outputs.

    Attributes:
        min_opset: upgrade models with an older default-domain opset to this one.
    """

    type: ClassVar[str] = "fold"
    min_opset: int = 13

    def __post_init__(self) -> None:
        if not 11 <= self.min_opset <= 23:
            raise ConfigError(f"min_opset must be between 11 and 23, not {self.min_opset}")


@dataclass(frozen=True, kw_only=True)
class ChannelPruneStep:
    """``prune.channels``: structured pruning (ChannelPruneConfig's options), then BatchNorm
    re-calibration.

    Attributes:
        config: the pruning options (``ratio`` or ``target_mac_reduction``, ``importance``,
            ``per_layer``, ``exclude``, ``min_channels``, ``round_to``).
        recalibrate_bn: re-measure BatchNorm statistics on the calibration data afterwards;
            ``null`` (default): when the model has BatchNorm and real data is given.
        recalibration_samples: how many calibration samples the re-measurement reads.
    """

    type: ClassVar[str] = "prune.channels"
    inner: ClassVar[Any] = ChannelPruneConfig
    config: ChannelPruneConfig
    recalibrate_bn: bool | None = None
    recalibration_samples: int = 256

    def __post_init__(self) -> None:
        _positive("recalibration_samples", self.recalibration_samples)


@dataclass(frozen=True, kw_only=True)
class MagnitudePruneStep:
    """``prune.magnitude``: unstructured pruning (MagnitudePruneConfig's options).

    Attributes:
        config: the pruning options (``sparsity`` or ``threshold``, ``scope``, ``exclude``,
            ``include_first_last``).
        sensitivity: report per-layer sensitivity (each layer pruned alone) first.
        recalibrate_bn: as for ``prune.channels``.
        recalibration_samples: as for ``prune.channels``.
    """

    type: ClassVar[str] = "prune.magnitude"
    inner: ClassVar[Any] = MagnitudePruneConfig
    config: MagnitudePruneConfig
    sensitivity: bool = True
    recalibrate_bn: bool | None = None
    recalibration_samples: int = 256

    def __post_init__(self) -> None:
        _positive("recalibration_samples", self.recalibration_samples)


@dataclass(frozen=True, kw_only=True)
class Int8Step:
    """``quantize.int8``: static QDQ int8 with calibration, fusion-aware clean-up and the
    accuracy fallback (Int8Config's options: ``method``, ``per_channel``, ``max_drop``,
    ``min_sqnr``, ``exclude``, ``provider``, ...)."""

    type: ClassVar[str] = "quantize.int8"
    inner: ClassVar[Any] = Int8Config
    config: Int8Config = field(default_factory=Int8Config)


@dataclass(frozen=True, kw_only=True)
class DistillStep:
    """``distill``: fine-tune the current model to imitate the input model (the teacher) on
    unlabelled data, in PyTorch (needs the ``train`` extra). Deterministic for a seed.

    Attributes:
        data: training samples (.npz, folder); ``null`` uses the calibration data.
        eval: optional extra data scored before and after (report only).
        max_samples: read at most this many training samples.
        epochs, lr, schedule, batch_size, temperature, alpha, l1, l2, use_labels, seed,
            val_fraction, patience, monitor, mixup: as for ``onnxshrink distill``.
    """

    type: ClassVar[str] = "distill"
    data: str | None = field(default=None, metadata=PATH)
    eval: str | None = field(default=None, metadata=PATH)
    max_samples: int | None = None
    epochs: int = 10
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = 32
    temperature: float = 4.0
    alpha: float = 0.9
    l1: float = 0.0
    l2: float = 0.0
    use_labels: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    patience: int = 3
    monitor: Literal["loss", "agreement"] = "loss"
    mixup: float = 0.0

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, strict=False)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size)
        if self.max_samples is not None:
            _positive("max_samples", self.max_samples)


@dataclass(frozen=True, kw_only=True)
class BenchStep:
    """``bench``: latency of the result against the input model, interleaved in one process
    (must be the last step; it changes nothing in the model).

    Attributes:
        provider: execution provider to time on (``cpu``, ``cuda``, ...).
        threads: intra-op threads for both models.
        rounds: interleaved rounds.
        min_speedup: a gate: fail (exit code 3, output still written) below this speed-up.
    """

    type: ClassVar[str] = "bench"
    provider: str = "cpu"
    threads: int = 1
    rounds: int = 30
    min_speedup: float | None = None

    def __post_init__(self) -> None:
        _positive("threads", self.threads)
        _positive("rounds", self.rounds)
        if self.min_speedup is not None:
            _positive("min_speedup", self.min_speedup)


Step = FoldStep | ChannelPruneStep | MagnitudePruneStep | Int8Step | DistillStep | BenchStep

#: Step type name -> step class, in the order the README lists them.
STEP_TYPES: dict[str, type[Any]] = {
    cls.type: cls for cls in (FoldStep, MagnitudePruneStep, ChannelPruneStep, Int8Step, DistillStep, BenchStep)
}


def _own_hints(cls: type[Any]) -> dict[str, Any]:
    return {k: v for k, v in field_hints(cls).items() if k != "config"}


def step_options(cls: type[Any]) -> list[str]:
    """Every option a step of class ``cls`` accepts, in file order."""
    inner = getattr(cls, "inner", None)
    return [*(field_hints(inner) if inner else {}), *_own_hints(cls)]


def step_from_dict(data: Any, where: str) -> Any:
    """A step object from its mapping in a recipe file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping with a 'type', not {data!r}")
    kind = data.get("type")
    if kind is None:
        raise ConfigError(f"{where} has no 'type' (one of {', '.join(STEP_TYPES)})")
    if kind not in STEP_TYPES:
        raise ConfigError(f"{where}: unknown step type {kind!r}{did_you_mean(str(kind), STEP_TYPES)}; known: {', '.join(STEP_TYPES)}")
    cls = STEP_TYPES[kind]
    where = f"{where} ({kind})"
    options = {k: v for k, v in data.items() if k != "type"}
    unknown_keys(where, options, step_options(cls))
    inner = getattr(cls, "inner", None)
    if inner is None:
        return build(cls, options, where)
    inner_names = set(field_hints(inner))
    config = build(inner, {k: v for k, v in options.items() if k in inner_names}, where)
    own_hints = _own_hints(cls)
    own = {k: coerce(v, own_hints[k], f"{where}: option '{k}'") for k, v in options.items() if k not in inner_names}
    try:
        return cls(config=config, **own)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def step_to_dict(step: Any, *, paths: bool = True) -> dict[str, Any]:
    """A step as the flat mapping a recipe file holds (every option, defaults included)."""
    out: dict[str, Any] = {"type": step.type}
    if getattr(step, "inner", None) is not None:
        out.update(to_plain_dict(step.config))
    for f in dataclasses.fields(step):
        if f.name == "config":
            continue
        if not paths and f.metadata.get("path"):
            continue
        out[f.name] = plain(getattr(step, f.name))
    return out
