"""What ``auto`` searches over, and the order it searches in (deterministic given results).

A :class:`Candidate` is one point of the space: a channel-pruning ratio (global, with
per-layer overrides for the groups the sensitivity probe ranks most fragile), the int8
calibration method and weight granularity, the int8 fp32-fallback target, and distillation
on/off. It compiles into a :class:`~onnxshrink.recipe.Recipe`, which is what is run, stamped
into the model and written out: the recipe reproduces the candidate's bytes.

:class:`Search` yields *waves* of candidates that can be evaluated in parallel; the next wave
depends only on the accuracy of the previous ones (never on timings), so a rerun proposes
exactly the same candidates and a resumed run can skip the finished ones.

1. int8 alone, and int8 on top of channel pruning at 25/50/75 %;
2. twice, three ratios inside the bracket (largest passing, smallest failing ratio);
3. from the smallest failing ratio up the coarse grid, channel counts kept at multiples of
   8 and 16 (odd counts can make int8 kernels slower than the MACs they save);
4. at the smallest failing ratio: other calibration methods, per-tensor weights and a
   tighter fp32-fallback target;
5. a sensitivity probe (each channel group pruned alone at that ratio, fp32), then that
   ratio with the 1, 2 and 4 most sensitive groups kept at the passing ratio;
6. with torch: distillation recovery on the coarse grid above the passing ratio (channel
   counts multiples of 16), smallest ratio first, while it keeps meeting the target.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from onnxshrink.prune import ChannelPruneConfig
from onnxshrink.quantize import Int8Config
from onnxshrink.recipe import BenchStep, ChannelPruneStep, DataSpec, DistillStep, Int8Step, Recipe

COARSE = (0.25, 0.5, 0.75)
ALIGNMENTS = (8, 16)
DISTILL_ALIGNMENT = 16
_GRID = 64  # ratios are multiples of 1/64


def _snap(ratio: float) -> float:
    return round(round(ratio * _GRID) / _GRID, 6)


@dataclass(frozen=True)
class Context:
    """What every candidate's recipe shares."""

    data: str
    train: str | None
    provider: str
    seed: int
    shapes: dict[str, list[int]] = field(default_factory=dict)
    distill_epochs: int = 20
    distill_samples: int | None = None
    distill_lr: float = 3e-3


@dataclass(frozen=True)
class Candidate:
    """One point of the search space (see the module docstring)."""

    ratio: float = 0.0
    protect: tuple[tuple[str, float], ...] = ()  # (producer node, its ratio)
    method: str = "auto"
    per_channel: bool = True
    fallback: float | None = None  # int8 max_drop for the fp32 fallback (None: its default)
    epochs: int = 0
    round_to: int = 1  # pruned channel counts kept a multiple of this
    probe: bool = False  # a sensitivity probe: pruning only, fp32, never chosen

    @property
    def key(self) -> str:
        parts = []
        if self.ratio or self.protect:
            parts.append(f"prune{self.ratio:g}" + (f"-align{self.round_to}" if self.round_to > 1 else ""))
        if self.protect:
            digest = hashlib.sha256(json.dumps(self.protect).encode()).hexdigest()[:8]
            parts.append(f"protect{len(self.protect)}-{digest}")
        if self.epochs:
            parts.append(f"distill{self.epochs}")
        if self.probe:
            return "probe:" + "+".join(parts)
        q = f"int8-{self.method}-{'pc' if self.per_channel else 'pt'}"
        if self.fallback is not None:
            q += f"-fb{self.fallback:g}"
        return "+".join([*parts, q])

    def describe(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "protect": [list(p) for p in self.protect],
            "method": self.method,
            "per_channel": self.per_channel,
            "fallback_max_drop": self.fallback,
            "distill_epochs": self.epochs,
            "round_to": self.round_to,
        }

    def recipe(self, ctx: Context) -> Recipe:
        steps: list[Any] = []
        if self.ratio or self.protect:
            per_layer = {f"re:^{re.escape(name)}$": r for name, r in self.protect}
            steps.append(ChannelPruneStep(config=ChannelPruneConfig(ratio=self.ratio, per_layer=per_layer, round_to=self.round_to)))
        if self.epochs:
            steps.append(DistillStep(
                data=ctx.train, max_samples=ctx.distill_samples, epochs=self.epochs, lr=ctx.distill_lr, mixup=1.0,
                patience=max(3, self.epochs // 4), seed=ctx.seed,
            ))  # fmt: skip
        if not self.probe:
            config = Int8Config(method=self.method, per_channel=self.per_channel, max_drop=self.fallback, provider=ctx.provider, seed=ctx.seed)
            steps += [Int8Step(config=config), BenchStep(provider=ctx.provider)]
        data = DataSpec(calibration=ctx.data, seed=ctx.seed, shapes={k: tuple(v) for k, v in ctx.shapes.items()})
        return Recipe(steps=tuple(steps), data=data, description=f"onnxshrink auto candidate {self.key}")


Verdict = Callable[[Candidate], "tuple[bool, float] | None"]  # (meets, error) or None if not run


class Search:
    """The wave generator. ``verdict(c)`` gives ``(meets_target, error)`` for a finished
    candidate (``error``: accuracy drop in points, or minus the SQNR), ``None`` otherwise."""

    def __init__(self, verdict: Verdict, *, groups: list[str], max_drop: float, distill: bool, epochs: int) -> None:
        self.verdict = verdict
        self.groups = groups  # first producer of every prunable channel group, graph order
        self.max_drop = max_drop
        self.distill = distill
        self.epochs = epochs

    def _bracket(self) -> tuple[float | None, float | None]:
        passed, failed = [], []
        for r in sorted({0.0, *COARSE, *self._fine}):
            v = self.verdict(Candidate(ratio=r))
            if v is not None:
                (passed if v[0] else failed).append(r)
        lo = max(passed) if passed else None
        above = [r for r in failed if lo is None or r > lo]
        return lo, (min(above) if above else None)

    def waves(self) -> Iterator[list[Candidate]]:
        self._fine: set[float] = set()
        yield [Candidate()] + [Candidate(ratio=r) for r in COARSE]
        for _ in range(2):
            lo, hi = self._bracket()
            if lo is None or hi is None or hi - lo <= 1.5 / _GRID:
                break
            points = sorted({_snap(lo + (hi - lo) * f) for f in (0.25, 0.5, 0.75)} - {lo, hi})
            self._fine.update(points)
            yield [Candidate(ratio=r) for r in points]
        lo, hi = self._bracket()
        if hi is None:
            return
        # Odd channel counts can make int8 kernels slower than the MACs saved: the same
        # ratios with channel counts kept at multiples of 8 and 16 (pruning less in small layers).
        ladder = sorted({hi, *(c for c in COARSE if c > hi)}) if hi > 0 else []
        yield [Candidate(ratio=r, round_to=a) for r in ladder for a in ALIGNMENTS]
        variants = [Candidate(ratio=hi, method=m) for m in ("percentile", "entropy", "minmax")]
        variants += [Candidate(ratio=hi, per_channel=False), Candidate(ratio=hi, fallback=round(self.max_drop / 4, 4))]
        yield variants
        if hi > 0 and lo is not None and len(self.groups) > 1:
            probes = [Candidate(protect=((g, hi),), probe=True) for g in self.groups]
            yield probes
            errors = {p.protect[0][0]: (self.verdict(p) or (False, 0.0))[1] for p in probes}
            ranked = sorted(self.groups, key=lambda g: (-errors[g], self.groups.index(g)))
            yield [
                Candidate(ratio=hi, protect=tuple((g, lo) for g in sorted(ranked[:k], key=self.groups.index)))
                for k in (1, 2, 4) if k < len(self.groups)
            ]  # fmt: skip
        if self.distill and hi > 0:
            # Recovery, from the narrowest miss on the coarse grid up, while it keeps passing.
            # Channel counts stay multiples of 16 (int8 kernels work in blocks of 16).
            for r in [c for c in COARSE if lo is None or c > lo]:
                c = Candidate(ratio=r, epochs=self.epochs, round_to=DISTILL_ALIGNMENT)
                yield [c]
                v = self.verdict(c)
                if v is None or not v[0]:
                    break
