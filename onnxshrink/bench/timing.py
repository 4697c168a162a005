"""Interleaved latency measurement: A B A B ... in one process, so noise hits all models alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class LatencyStats:
    """Per-run latencies of one model, in milliseconds."""

    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples_ms, 50))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples_ms, 90))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_ms))


def measure_interleaved(
    sessions: Sequence[Any],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    warmup: int = 5,
    rounds: int = 30,
    max_seconds: float | None = None,
) -> list[LatencyStats]:
    """Run each session once per round, in turn, cycling through ``feeds``.

    Args:
        sessions: onnxruntime sessions taking the same inputs.
        feeds: one or more feeds; round ``i`` uses ``feeds[i % len(feeds)]`` for every model.
        warmup: untimed rounds first.
        rounds: timed rounds (at least 3 are always run).
        max_seconds: stop early (after 3 rounds at least) once this much time has passed.
    """
    for i in range(warmup):
        for s in sessions:
            s.run(None, feeds[i % len(feeds)])
    samples: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for i in range(max(rounds, 3)):
        feed = feeds[i % len(feeds)]
        # Alternate the order every round so neither model always runs right after the other.
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            samples[k].append((time.perf_counter() - t0) * 1000.0)
        if max_seconds is not None and i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return [LatencyStats(s) for s in samples]


def paired_ratio(candidate: LatencyStats, baseline: LatencyStats) -> float:
    """Median of per-round candidate/baseline ratios (robust to drifts in machine load)."""
    pairs = np.asarray(candidate.samples_ms) / np.asarray(baseline.samples_ms)
    return float(np.median(pairs))
