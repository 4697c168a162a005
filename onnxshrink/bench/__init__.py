"""Benchmarking: latency measured interleaved, so that ratios hold on a noisy machine."""

from onnxshrink.bench.timing import LatencyStats, measure_interleaved

__all__ = ["LatencyStats", "measure_interleaved"]
