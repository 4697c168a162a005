"""The JSON document ``onnxshrink bench --json`` prints (and ``--report DIR`` saves as bench.json).

Schema ``onnxshrink.bench/1``. Keys are only ever added within version 1; a removal or a change
of meaning bumps the version. Times are milliseconds unless the key says ``us`` (microseconds);
sizes are bytes; ratios and shares are plain fractions; ``null`` means "not measured".
Non-finite floats (an SQNR of identical outputs) are written as the strings ``"inf"``/``"-inf"``.

.. code-block:: text

    schema            "onnxshrink.bench/1"
    created           ISO-8601 UTC time of the run
    environment       {onnxshrink, onnxruntime, onnx, numpy, python, platform: str,
                       cpu: str (model name), cpu_count: int, available_providers: [str],
                       load_average: [1, 5, 15-minute] before the run, or null}
    settings
      provider        full onnxruntime provider name that ran the models
      provider_options {key: value} passed to the provider
      threads         intra-op threads, or null (onnxruntime's default)
      batch           rows per run (the leading dimension of the inputs)
      input_shapes    {input name: [int]} of the timed feeds
      warmup          untimed rounds first
      runs            timed rounds done (one run of every model per round)
      min_runs, min_time_s  what was asked: at least min_runs rounds and min_time_s seconds
      seed            seed of random inputs and of the bootstrap
      data            {source: path or "random", kind: "labelled"|"unlabelled"|"random",
                       samples: int (rows evaluated for accuracy/fidelity)}
      memory_runs     runs inside the memory probe, or null when skipped
      profile_runs    runs counted by the profiler, or null when skipped
    models            [model], baseline first
      name            file stem (made unique with #2, #3...)
      path            as given
      role            "baseline" | "candidate"
      size            {model_file_bytes, external_data_bytes, total_bytes: int}
      session_create_ms  wall time of InferenceSession creation in the benchmark process
      latency_ms      {runs: int, p50, p90, p99, mean, min, max, std: float,
                       samples_ms: [float] (one per timed round, in round order)}
      throughput_per_s  batch / p50 latency, rows per second
      memory          null | {method: "vmhwm-reset"|"vmhwm-delta"|"rusage-delta"|null,
                       peak_rss_growth_bytes: int|null (this model's session: creation + runs),
                       runtime_init_bytes: int|null (onnxruntime's one-time cost per process),
                       process_peak_rss_bytes: int|null (whole child process, Python included),
                       runs: int, error: str|null}  (see onnxshrink.bench.memory)
      accuracy        null (no labels, or outputs are not class scores) |
                      {top1: float, top5: float|null (<= 5 classes), samples: int}
      vs_baseline     null for the baseline; for a candidate:
        latency_ratio       p50(candidate) / p50(baseline) (< 1: candidate faster)
        latency_ratio_ci95  [low, high]: seeded paired bootstrap over rounds, 2000 resamples
        latency_ratio_blocks  [float]: the ratio within each quarter of the rounds (drift check)
        paired_median_ratio median over rounds of candidate/baseline (a second estimate)
        speedup             1 / latency_ratio = p50(baseline) / p50(candidate)
        fidelity            {samples: int, sqnr_db, cosine, max_abs_error: float|str,
                             top1_agreement: float|null, accuracy_reference,
                             accuracy_candidate, accuracy_drop_points,
                             expected_drop_points: float|null}
                            (candidate outputs against the baseline's on settings.data;
                            expected_drop_points weighs each top-1 flip by the
                            baseline's own class probability margin)
      profile         null | {runs: int, total_us_per_run: float,
                       by_op_type: [{op_type: str, us_per_run: float (median over runs),
                                     share: float, nodes: int}] slowest first,
                       providers: {provider: nodes it ran},
                       cpu_fallback_nodes: [{name, op_type}] (only for non-CPU providers)}
      fusion          null | {summary: str} + onnxshrink.fusion.FusionReport.to_json(): provider,
                       int8_kernels, int8_mac_fraction, int8_macs, total_macs,
                       remaining_quantize_linear, remaining_dequantize_linear, unfused_units,
                       unfused_by_op_type, redundant_qdq_pairs, optimized_ops
    gates             [{name: "min_speedup"|"max_drop"|"min_agreement"|"max_size",
                        model: str, threshold: float, value: float|null, passed: bool,
                        detail: str (what value is)}]
    passed            true when every gate passed (also true with no gates)
    notes             [str]: caveats of this run (random inputs, dropped samples, ...)
"""

from __future__ import annotations

from typing import Any

SCHEMA = "onnxshrink.bench/1"

#: Top-level keys and their JSON types (for validating consumers and for the tests).
TOP_LEVEL: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "created": str,
    "environment": dict,
    "settings": dict,
    "models": list,
    "gates": list,
    "passed": bool,
    "notes": list,
}

MODEL_KEYS = (
    "name", "path", "role", "size", "session_create_ms", "latency_ms", "throughput_per_s",
    "memory", "accuracy", "vs_baseline", "profile", "fusion",
)  # fmt: skip


def check(payload: dict[str, Any]) -> list[str]:
    """Problems with ``payload`` against schema version 1 (empty when it conforms)."""
    problems = []
    for key, kind in TOP_LEVEL.items():
        if not isinstance(payload.get(key), kind):
            problems.append(f"{key}: expected {kind}, got {type(payload.get(key)).__name__}")
    if payload.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}")
    for i, model in enumerate(payload.get("models") or []):
        missing = [k for k in MODEL_KEYS if k not in model]
        if missing:
            problems.append(f"models[{i}]: missing {missing}")
    return problems
