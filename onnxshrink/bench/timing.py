"""Interleaved latency measurement and the statistics reported on it.

Models are timed in one process, A B A B ..., one run of each per *round*, with the order
reversed every other round. Machine noise (another process, frequency scaling, thermal
throttling) then hits every model alike within a round, so the *ratio* of two models'
latencies holds even when absolute figures drift.

Statistics (all in milliseconds, one sample per timed run):

* ``p50``/``p90``/``p99``: percentiles with linear interpolation (``numpy.percentile``'s
  default), ``mean``, ``min``, ``max``, ``std`` (population).
* :func:`ratio_interval`: the latency ratio candidate/baseline is ``p50(candidate) /
  p50(baseline)``; its confidence interval comes from a seeded *paired* bootstrap: round
  indices are resampled with replacement (the same indices for both models, which keeps the
  pairing that interleaving creates), the ratio of medians is recomputed for each resample,
  and the interval is the central ``confidence`` share of those ratios (percentile method).
* :func:`paired_ratio`: the median of per-round ratios, a second robust estimate that
  ``shrink`` uses; it is reported beside the ratio of medians, not instead of it.
* :func:`block_ratios`: the ratio of medians within consecutive quarters of the run. The
  bootstrap interval only covers round-to-round noise; if other work on the machine starts or
  stops mid-run (or differs between two runs), models can be slowed by different factors —
  measured here: an int8 and an fp32 model on a busy 2-CPU machine moved their ratio by up to
  a third between back-to-back runs while two copies of one model stayed within 3%. A spread
  of block ratios flags the within-run part of that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The most rounds ``min_seconds`` may add (bounds memory and time for microsecond models).
MAX_ROUNDS = 100_000
#: Bootstrap resamples used by :func:`ratio_interval` unless told otherwise.
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class LatencyStats:
    """Per-run latencies of one model, in milliseconds."""

    samples_ms: list[float]

    def _pct(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def p50(self) -> float:
        return self._pct(50)

    @property
    def p90(self) -> float:
        return self._pct(90)

    @property
    def p99(self) -> float:
        return self._pct(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_ms))

    @property
    def max(self) -> float:
        return float(np.max(self.samples_ms))

    @property
    def std(self) -> float:
        return float(np.std(self.samples_ms))

    def throughput(self, batch: int) -> float:
        """Samples per second at the median latency: ``batch / p50``."""
        return batch * 1000.0 / self.p50 if self.p50 > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": len(self.samples_ms),
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "std": self.std,
            "samples_ms": [round(s, 6) for s in self.samples_ms],
        }


def measure_interleaved(
    sessions: Sequence[Any],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    warmup: int = 5,
    rounds: int = 30,
    max_seconds: float | None = None,
    min_seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[LatencyStats]:
    """Run each session once per round, in turn, cycling through ``feeds``.

    Args:
        sessions: onnxruntime sessions taking the same inputs.
        feeds: one or more feeds; round ``i`` uses ``feeds[i % len(feeds)]`` for every model.
        warmup: untimed rounds first.
        rounds: timed rounds (at least 3 are always run).
        max_seconds: stop early (after 3 rounds at least) once this much time has passed.
        min_seconds: go on past ``rounds`` until this much time has passed (at most
            :data:`MAX_ROUNDS` rounds): a fast model's 100 runs last a few milliseconds, too
            short a window to average out the machine's other work.
        progress: called with 1 after every round, warm-up rounds included (a progress bar).
    """
    for i in range(warmup):
        for s in sessions:
            s.run(None, feeds[i % len(feeds)])
        if progress is not None:
            progress(1)
    samples: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    i = 0
    while True:
        feed = feeds[i % len(feeds)]
        # Alternate the order every round so neither model always runs right after the other.
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            samples[k].append((time.perf_counter() - t0) * 1000.0)
        if progress is not None:
            progress(1)
        i += 1
        elapsed = time.perf_counter() - start
        if i < 3:
            continue
        if max_seconds is not None and elapsed > max_seconds:
            break
        if i >= rounds and (min_seconds is None or elapsed >= min_seconds or i >= MAX_ROUNDS):
            break
    return [LatencyStats(s) for s in samples]


def paired_ratio(candidate: LatencyStats, baseline: LatencyStats) -> float:
    """Median of per-round candidate/baseline ratios (robust to drifts in machine load)."""
    pairs = np.asarray(candidate.samples_ms) / np.asarray(baseline.samples_ms)
    return float(np.median(pairs))


def median_ratio(candidate: LatencyStats, baseline: LatencyStats) -> float:
    """``p50(candidate) / p50(baseline)``: the ratio the report and the speed-up gate use."""
    return candidate.p50 / baseline.p50


def block_ratios(candidate: LatencyStats, baseline: LatencyStats, *, blocks: int = 4) -> list[float]:
    """``p50(candidate) / p50(baseline)`` within each of ``blocks`` consecutive stretches of rounds.

    The bootstrap interval assumes the machine behaved the same throughout; when these differ
    a lot, it did not (other work started or stopped), and the interval is too optimistic.
    """
    cand = np.asarray(candidate.samples_ms, dtype=np.float64)
    base = np.asarray(baseline.samples_ms, dtype=np.float64)
    parts = max(1, min(blocks, cand.size // 3))
    return [
        float(np.median(c) / np.median(b))
        for c, b in zip(np.array_split(cand, parts), np.array_split(base, parts))
    ]


def ratio_interval(
    candidate: LatencyStats,
    baseline: LatencyStats,
    *,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired-bootstrap confidence interval of ``p50(candidate) / p50(baseline)``.

    Both sample lists must come from the same rounds of :func:`measure_interleaved` (equal
    length, index ``i`` = round ``i``). Deterministic for a given ``seed``.
    """
    cand = np.asarray(candidate.samples_ms, dtype=np.float64)
    base = np.asarray(baseline.samples_ms, dtype=np.float64)
    if cand.shape != base.shape or cand.size == 0:
        raise ValueError(f"paired samples must have the same, non-zero length ({cand.size} vs {base.size})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    rng = np.random.default_rng(seed)
    n = cand.size
    ratios = np.empty(resamples, dtype=np.float64)
    # Chunked so that memory stays small for long runs (resamples x n indices at once).
    chunk = max(1, 2_000_000 // n)
    for lo in range(0, resamples, chunk):
        hi = min(resamples, lo + chunk)
        idx = rng.integers(0, n, size=(hi - lo, n))
        ratios[lo:hi] = np.median(cand[idx], axis=1) / np.median(base[idx], axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)
