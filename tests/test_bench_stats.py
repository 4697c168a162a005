"""Statistics, trace parsing, gates and charts of ``onnxshrink bench`` on synthetic inputs."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from onnxshrink.bench.gates import GateSpec, evaluate
from onnxshrink.bench.profiling import parse_trace, profile_model, require_provider
from onnxshrink.bench.svg import box_plot, nice_ticks, scatter, stacked_bars
from onnxshrink.bench.timing import (
    LatencyStats,
    block_ratios,
    measure_interleaved,
    median_ratio,
    paired_ratio,
    ratio_interval,
)
from onnxshrink.errors import ConfigError
from onnxshrink.runtime import make_session
from onnxshrink.testing import conv_net


def test_percentiles_and_summary_on_known_samples() -> None:
    stats = LatencyStats([float(v) for v in range(100, 0, -1)])  # 1..100, unsorted
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5)
    assert (stats.min, stats.max) == (1.0, 100.0)
    assert stats.throughput(4) == pytest.approx(4 * 1000.0 / 50.5)
    doc = stats.to_json()
    assert doc["runs"] == 100 and len(doc["samples_ms"]) == 100 and doc["p50"] == pytest.approx(50.5)


def test_ratio_is_exact_when_candidate_is_a_constant_fraction() -> None:
    base = LatencyStats(list(np.random.default_rng(1).uniform(1.0, 3.0, 40)))
    cand = LatencyStats([0.5 * v for v in base.samples_ms])
    assert median_ratio(cand, base) == pytest.approx(0.5)
    assert paired_ratio(cand, base) == pytest.approx(0.5)
    low, high = ratio_interval(cand, base)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)


def _noisy_pair(rng: np.random.Generator, n: int, true_ratio: float) -> tuple[LatencyStats, LatencyStats]:
    """Interleaved-like timings: a per-round drift shared by both models, plus own noise."""
    drift = rng.lognormal(0.0, 0.3, n)
    base = 2.0 * drift * rng.lognormal(0.0, 0.08, n)
    cand = 2.0 * true_ratio * drift * rng.lognormal(0.0, 0.08, n)
    return LatencyStats(list(cand)), LatencyStats(list(base))


def test_ratio_interval_is_seeded_and_shrinks_with_more_rounds() -> None:
    cand, base = _noisy_pair(np.random.default_rng(3), 60, 0.7)
    assert ratio_interval(cand, base, seed=5) == ratio_interval(cand, base, seed=5)
    low, high = ratio_interval(cand, base, seed=5)
    assert low <= median_ratio(cand, base) <= high
    cand_long, base_long = _noisy_pair(np.random.default_rng(4), 600, 0.7)
    low_long, high_long = ratio_interval(cand_long, base_long, seed=5)
    assert high_long - low_long < high - low


def test_ratio_interval_covers_the_true_ratio_most_of_the_time() -> None:
    rng = np.random.default_rng(11)
    hits = 0
    trials = 60
    for t in range(trials):
        cand, base = _noisy_pair(rng, 50, 0.7)
        low, high = ratio_interval(cand, base, resamples=400, seed=t)
        hits += low <= 0.7 <= high
    assert hits / trials >= 0.85  # nominal 95%; percentile bootstrap of a median runs a bit low


def test_block_ratios_show_drift_within_a_run() -> None:
    base = LatencyStats([1.0] * 40)
    steady = LatencyStats([0.5] * 40)
    drifting = LatencyStats([0.5] * 20 + [0.8] * 20)
    assert block_ratios(steady, base) == pytest.approx([0.5] * 4)
    assert block_ratios(drifting, base) == pytest.approx([0.5, 0.5, 0.8, 0.8])
    assert block_ratios(LatencyStats([1.0] * 4), LatencyStats([2.0] * 4)) == [0.5]  # too short to split


def test_ratio_interval_rejects_unpaired_samples() -> None:
    with pytest.raises(ValueError, match="same"):
        ratio_interval(LatencyStats([1.0, 2.0]), LatencyStats([1.0, 2.0, 3.0]))


def test_measure_interleaved_on_real_sessions() -> None:
    small = make_session(conv_net(channels=(3, 4), size=24, seed=0))
    large = make_session(conv_net(channels=(3, 32, 32), size=24, seed=0))
    feeds = [{"input": np.zeros((1, 3, 24, 24), np.float32)}]
    calls: list[int] = []
    stats = measure_interleaved([small, large], feeds, warmup=2, rounds=5, progress=calls.append)
    assert [len(s.samples_ms) for s in stats] == [5, 5]
    assert sum(calls) == 7
    assert all(v > 0 for s in stats for v in s.samples_ms)
    longer = measure_interleaved([small, large], feeds, warmup=0, rounds=3, min_seconds=0.05)
    assert len(longer[0].samples_ms) == len(longer[1].samples_ms) > 3
    capped = measure_interleaved([small, large], feeds, warmup=0, rounds=50, max_seconds=0.0)
    assert len(capped[0].samples_ms) == 3


def _event(
    name: str, ts: int, dur: int, op: str | None = None, provider: str = "CPUExecutionProvider"
) -> dict:
    if op is None:
        return {"cat": "Session", "name": name, "ts": ts, "dur": dur, "args": {}}
    return {
        "cat": "Node",
        "name": f"{name}_kernel_time",
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op, "provider": provider},
    }


def test_parse_trace_skips_first_run_and_takes_per_run_medians() -> None:
    events = []
    for run, (conv, relu) in enumerate([(900, 90), (100, 10), (110, 12), (5000, 11)]):
        t = run * 10_000
        events.append(_event("model_run", t, 9_000))
        events.append(_event("conv0", t + 10, conv, "Conv"))
        events.append(_event("relu0", t + 20, relu, "Relu"))
    profile = parse_trace(events, requested_provider="CPUExecutionProvider")
    assert profile.runs == 3
    times = {o.op_type: o.us_per_run for o in profile.by_op_type}
    assert times == {"Conv": 110.0, "Relu": 11.0}  # medians of runs 2-4; run 1 dropped
    assert profile.by_op_type[0].op_type == "Conv"
    assert profile.providers == {"CPUExecutionProvider": 2}
    assert profile.cpu_fallback_nodes == []


def test_parse_trace_reports_cpu_fallback_for_gpu_providers() -> None:
    events = [
        _event("model_run", 0, 100),
        _event("model_run", 1000, 100),
        _event("conv0", 1010, 50, "Conv", "CUDAExecutionProvider"),
        _event("shape0", 1060, 2, "Shape", "CPUExecutionProvider"),
        _event("copy0", 1070, 5, "MemcpyToHost", "CPUExecutionProvider"),
    ]
    profile = parse_trace(events, requested_provider="CUDAExecutionProvider")
    assert profile.providers == {"CPUExecutionProvider": 2, "CUDAExecutionProvider": 1}
    assert {f["op_type"] for f in profile.cpu_fallback_nodes} == {"Shape", "MemcpyToHost"}
    assert profile.to_json()["by_op_type"][0]["share"] == pytest.approx(50 / 57)


def test_profile_model_real_session_leaves_no_trace_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = conv_net(channels=(3, 8), size=12, seed=2)
    feed = {"input": np.zeros((1, 3, 12, 12), np.float32)}
    profile = profile_model(
        model.SerializeToString(), feed, provider="cpu", threads=1, provider_options={}, runs=4
    )
    assert profile.runs == 4
    ops = {o.op_type for o in profile.by_op_type}
    assert ops & {"Conv", "FusedConv"} and "Gemm" in " ".join(ops)
    assert profile.providers.keys() == {"CPUExecutionProvider"}
    assert profile.total_us_per_run > 0
    assert os.listdir(tmp_path) == []


def test_require_provider_refuses_a_silent_cpu_fallback() -> None:
    session = make_session(conv_net(channels=(3, 4), size=8))
    require_provider(session, "CPUExecutionProvider")
    with pytest.raises(ConfigError, match="failed to start"):
        require_provider(session, "CUDAExecutionProvider")


def _model(
    name: str, *, top1: float | None, agreement: float | None, speedup: float = 2.0, size: int = 10**6
) -> dict:
    return {
        "name": name,
        "size": {"total_bytes": size},
        "accuracy": None if top1 is None else {"top1": top1},
        "vs_baseline": {"speedup": speedup, "fidelity": {"top1_agreement": agreement}},
    }


def test_gates_use_accuracy_with_labels_and_agreement_without() -> None:
    base = _model("fp32", top1=0.95, agreement=None)
    base["vs_baseline"] = None
    cand = _model("int8", top1=0.94, agreement=0.97, speedup=1.8, size=2_500_000)
    spec = GateSpec(min_speedup=2.0, max_drop=1.5, min_agreement=0.98, max_size_mb=2.5)
    gates = {g.name: g for g in evaluate(spec, [base, cand], data_kind="labelled")}
    assert gates["min_speedup"].passed is False and gates["min_speedup"].value == pytest.approx(1.8)
    assert gates["max_drop"].passed is True and gates["max_drop"].value == pytest.approx(1.0)
    assert "accuracy" in gates["max_drop"].detail
    assert gates["min_agreement"].passed is False
    assert gates["max_size"].passed is True and gates["max_size"].value == pytest.approx(
        2.5
    )  # boundary passes
    base["accuracy"] = cand["accuracy"] = None
    drop = evaluate(GateSpec(max_drop=1.5), [base, cand], data_kind="random")[0]
    assert drop.value == pytest.approx(3.0) and not drop.passed and "RANDOM" in drop.detail


def test_gate_that_cannot_be_measured_fails() -> None:
    base = _model("a", top1=None, agreement=None)
    cand = _model("b", top1=None, agreement=None)
    gates = evaluate(GateSpec(max_drop=5, min_agreement=0.5), [base, cand], data_kind="unlabelled")
    assert [g.passed for g in gates] == [False, False]
    assert all(g.value is None and "not measurable" in g.detail for g in gates)


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    ticks = nice_ticks(0.13, 0.91)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.91
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and steps.pop() in (0.1, 0.2, 0.25)
    assert nice_ticks(5.0, 5.0)  # degenerate range still gives ticks


def test_charts_are_well_formed_svg() -> None:
    import xml.etree.ElementTree as ET

    charts = [
        box_plot([("a<b", [1.0, 1.2, 1.1, 5.0]), ("c", [0.5, 0.6, 0.55])]),
        scatter([("a", 1.0, 95.0), ("b", 0.5, 94.0)], x_label="ms", y_label="top-1 (%)"),
        stacked_bars([("a", [("Conv", 10.0), ("Relu", 2.0)]), ("b", [("QLinearConv", 5.0)])], unit="us"),
    ]
    for chart in charts:
        root = ET.fromstring(chart)
        assert root.tag.endswith("svg")
    assert "a&lt;b" in charts[0]
