"""Benchmarking: latency measured interleaved, size, memory, accuracy, profile, gates, reports.

``run_bench(paths, BenchConfig(...))`` returns the JSON payload documented in
:mod:`onnxshrink.bench.schema`; :func:`onnxshrink.bench.text.render` and
:func:`onnxshrink.bench.html.write_report` present it.
"""

from onnxshrink.bench.timing import LatencyStats, measure_interleaved, paired_ratio, ratio_interval

__all__ = ["LatencyStats", "measure_interleaved", "paired_ratio", "ratio_interval"]
