"""Configuration of the pruning passes: frozen dataclasses, validated on construction.

Both configs round-trip through plain dicts (``to_dict`` / ``from_dict``) so that a recipe
file or the CLI can build them; unknown keys and bad values raise :class:`ConfigError` with
a message that names the field.

Name patterns (``exclude``, the keys of ``per_layer``) match node names and weight
(initializer) names. A pattern is a shell glob matched against the whole name
(``"layer4.*"``, ``"*downsample*"``), or, with a ``re:`` prefix, a regular expression
searched anywhere in the name (``"re:^fc|classifier"``).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from onnxshrink.errors import ConfigError

Scope = Literal["layer", "global"]
Importance = Literal["l1", "l2", "bn_gamma"]

_SCOPES = ("layer", "global")
_IMPORTANCES = ("l1", "l2", "bn_gamma")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a glob or ``re:`` pattern (see the module docstring) into a regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"name pattern {pattern!r} must be a non-empty string")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return re.compile(fnmatch.translate(pattern))


def pattern_matches(pattern: str, names: Iterable[str]) -> str | None:
    """The first of ``names`` that ``pattern`` matches, or None."""
    regex = compile_pattern(pattern)
    search = pattern.startswith("re:")
    for name in names:
        if name and (regex.search(name) if search else regex.match(name)):
            return name
    return None


def _check_fraction(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), not {value}")


def _check_patterns(name: str, patterns: tuple[str, ...]) -> None:
    if isinstance(patterns, str) or not isinstance(patterns, tuple):
        raise ConfigError(f"{name} must be a tuple of name patterns, not {patterns!r}")
    for p in patterns:
        compile_pattern(p)


def _from_dict(cls: type[Any], data: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"{cls.__name__}: unknown option(s) {', '.join(hints)}; known: {', '.join(sorted(known))}"
        )
    values = dict(data)
    if "exclude" in values and isinstance(values["exclude"], list):
        values["exclude"] = tuple(values["exclude"])
    return cls(**values)


@dataclass(frozen=True, kw_only=True)
class MagnitudePruneConfig:
    """Unstructured magnitude pruning: ``w = 0 where |w| < eps``.

    Attributes:
        sparsity: fraction of each eligible weight (``scope="layer"``) or of all eligible
            weights together (``scope="global"``) to set to zero, the smallest magnitudes
            first. Exactly one of ``sparsity`` and ``threshold`` is given.
        threshold: zero every weight with ``|w| < threshold`` (``scope`` does not apply).
        scope: ``"layer"`` (each weight reaches ``sparsity``) or ``"global"`` (one
            magnitude threshold for all eligible weights, so layers end up with different
            sparsities).
        exclude: name patterns (node or weight names) of layers to leave dense.
        include_first_last: also prune the first and the last weighted layer (in graph
            order); by default they are left dense because they are the most sensitive.
    """

    sparsity: float | None = None
    threshold: float | None = None
    scope: Scope = "layer"
    exclude: tuple[str, ...] = ()
    include_first_last: bool = False

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.threshold is None):
            raise ConfigError("give exactly one of sparsity and threshold for magnitude pruning")
        _check_fraction("sparsity", self.sparsity)
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise ConfigError(f"threshold must be a finite number >= 0, not {t!r}")
        if self.scope not in _SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(_SCOPES)}, not {self.scope!r}")
        _check_patterns("exclude", self.exclude)
        if not isinstance(self.include_first_last, bool):
            raise ConfigError("include_first_last must be true or false")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MagnitudePruneConfig:
        return _from_dict(cls, data)  # type: ignore[no-any-return]


@dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig:
    """Structured channel pruning: remove whole output channels and what depends on them.

    Attributes:
        ratio: fraction of the channels of every prunable group to remove.
        target_mac_reduction: instead of ``ratio``, the fraction of the model's MACs to
            remove; the uniform ratio that reaches it is found by bisection. Exactly one of
            ``ratio`` and ``target_mac_reduction`` is given.
        importance: how channels are ranked: ``"l1"`` / ``"l2"`` norm of the producing
            filters, or ``"bn_gamma"`` (|gamma| of the BatchNormalization nodes in the
            group; groups without one fall back to L1). Scores of the group's members
            are each normalised to mean 1 and summed.
        per_layer: ratio overrides, keyed by a producing node's name or weight name (or a
            pattern); a group takes the smallest override of its producers.
        exclude: name patterns; every group that touches a matching node or weight (as
            producer, consumer or parameter) is left alone.
        min_channels: never keep fewer channels than this in any member of a group.
        round_to: keep channel counts at a multiple of this (e.g. 8 for SIMD kernels),
            rounding the number kept up.
    """

    ratio: float | None = None
    target_mac_reduction: float | None = None
    importance: Importance = "l1"
    per_layer: Mapping[str, float] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    round_to: int = 1

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.target_mac_reduction is None):
            raise ConfigError("give exactly one of ratio and target_mac_reduction for channel pruning")
        _check_fraction("ratio", self.ratio)
        _check_fraction("target_mac_reduction", self.target_mac_reduction)
        if self.importance not in _IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(_IMPORTANCES)}, not {self.importance!r}")
        if not isinstance(self.per_layer, Mapping):
            raise ConfigError("per_layer must map layer names to ratios")
        for key, value in self.per_layer.items():
            compile_pattern(key)
            _check_fraction(f"per_layer[{key!r}]", value, allow_none=False)
        _check_patterns("exclude", self.exclude)
        for name in ("min_channels", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        out["per_layer"] = dict(self.per_layer)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelPruneConfig:
        return _from_dict(cls, data)  # type: ignore[no-any-return]
