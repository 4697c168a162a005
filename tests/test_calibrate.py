"""Streaming calibration statistics and range choice."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.quantize.calibrate import BINS, TensorStats, choose_range


def _stats(chunks: list[np.ndarray]) -> TensorStats:
    stats = TensorStats()
    for chunk in chunks:
        stats.update(chunk, histogram=True)
    return stats


def test_histogram_doubling_matches_a_direct_histogram():
    rng = np.random.default_rng(0)
    # Ranges grow over the stream, forcing several doublings.
    chunks = [rng.normal(0, s, 5000).astype(np.float32) for s in (0.1, 0.5, 2.0, 7.0)]
    stats = _stats(chunks)
    data = np.concatenate(chunks)
    direct, _ = np.histogram(data, bins=BINS, range=(-stats.radius, stats.radius))
    assert stats.hist.sum() == data.size
    # Merged bins may differ from a direct histogram only at the bin edges of early chunks.
    coarse = stats.hist.reshape(-1, 64).sum(axis=1)
    direct_coarse = direct.reshape(-1, 64).sum(axis=1)
    assert np.abs(coarse - direct_coarse).sum() <= 0.01 * data.size
    assert stats.lo == pytest.approx(float(data.min())) and stats.hi == pytest.approx(float(data.max()))


def test_memory_does_not_grow_with_samples():
    stats = _stats([np.random.default_rng(i).normal(size=1000).astype(np.float32) for i in range(200)])
    assert stats.hist.shape == (BINS,)


def test_minmax_is_the_observed_range_including_zero():
    stats = _stats([np.array([0.5, 2.0, 3.0], np.float32)])
    assert choose_range(stats, "minmax") == (0.0, 3.0)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_outliers_are_clipped_by_histogram_methods(method):
    rng = np.random.default_rng(1)
    relu_like = np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)
    relu_like[:30] = 400.0  # a few outliers would waste almost all of uint8's levels
    stats = _stats([relu_like])
    lo, hi = choose_range(stats, method, percentile=99.9)
    assert lo == 0.0
    assert 2.0 < hi < 100.0, (method, hi)


def _quant_mse(x: np.ndarray, lo: float, hi: float) -> float:
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.mean((x - (q - zero) * scale) ** 2))


def test_mse_range_beats_minmax_on_heavy_tails():
    x = np.random.default_rng(3).laplace(0, 1, 200_000).astype(np.float32)
    stats = _stats([x])
    lo, hi = choose_range(stats, "mse")
    assert hi < stats.hi and lo > stats.lo, "a heavy-tailed tensor should be clipped"
    assert _quant_mse(x, lo, hi) < 0.8 * _quant_mse(x, *choose_range(stats, "minmax"))


def test_mse_keeps_the_full_range_of_a_uniform_tensor():
    data = np.random.default_rng(2).uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = choose_range(_stats([data]), "mse")
    assert lo < -0.9 and hi > 0.9


def test_non_finite_activations_are_refused():
    from onnxshrink.errors import DataError

    with pytest.raises(DataError, match="NaN or infinite"):
        _stats([np.array([1.0, np.inf], np.float32)])
