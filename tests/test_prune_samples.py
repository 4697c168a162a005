"""Pruning the trained sample models (sample_models/), scored on digits_eval.npz.

Skipped when the sample files are not there. Accuracy is top-1 over the 1000 evaluation
digits (one point = 10 digits); nothing is fine-tuned.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxshrink.modelio import load_model
from onnxshrink.prune import (
    ChannelPruneConfig,
    MagnitudePruneConfig,
    prune_channels,
    prune_magnitude,
    recalibrate_batchnorm,
)
from onnxshrink.runtime import make_session, run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
NAMES = ["plain_cnn", "resnet_mini", "mobilenet_mini"]


def _require(*files: str) -> None:
    missing = [f for f in files if not (SAMPLES / f).exists()]
    if missing:
        pytest.skip(f"sample files missing: {missing}")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _require("digits_eval.npz")
    with np.load(SAMPLES / "digits_eval.npz") as data:
        return data["input"], data["labels"]


@pytest.fixture(scope="module")
def calibration() -> list[dict[str, np.ndarray]]:
    _require("digits_calib.npz")
    with np.load(SAMPLES / "digits_calib.npz") as data:
        x = data["input"]
    return [{"input": x[i : i + 100]} for i in range(0, 200, 100)]  # 200 digits keep the test fast


def accuracy(model: onnx.ModelProto, digits: tuple[np.ndarray, np.ndarray]) -> float:
    x, labels = digits
    return float(np.mean(run(make_session(model), {"input": x})[0].argmax(axis=1) == labels))


def load(name: str) -> onnx.ModelProto:
    _require(f"{name}.onnx")
    return load_model(SAMPLES / f"{name}.onnx")[0]


@pytest.mark.parametrize("name", ["plain_cnn", "resnet_mini"])
def test_half_sparsity_costs_at_most_one_point(name, digits):
    model = load(name)
    dense = accuracy(model, digits)
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, scope="global"))
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)
    assert accuracy(model, digits) >= dense - 0.01


def test_half_sparsity_mobilenet_needs_batchnorm_recalibration(digits, calibration):
    """Without it this small MobileNet collapses at 50 % sparsity; re-measuring the BN
    statistics on 200 unlabelled calibration digits brings it back within a point."""
    model = load("mobilenet_mini")
    dense = accuracy(model, digits)
    prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, scope="global"))
    assert recalibrate_batchnorm(model, calibration) == 20
    assert accuracy(model, digits) >= dense - 0.01


@pytest.mark.parametrize("name", NAMES)
def test_channel_pruning_runs_on_the_sample_models(name, digits, calibration):
    model = load(name)
    original = copy.deepcopy(model)
    report = prune_channels(model, ChannelPruneConfig(ratio=0.5))
    onnx.checker.check_model(model, full_check=True)
    assert report.count("pruned") >= 5 and report.skip_tally == {"graph-output": 1}
    assert report.macs_after is not None and report.macs_before is not None
    assert report.macs_after < 0.35 * report.macs_before
    assert 0.0 <= accuracy(model, digits) <= 1.0
    assert accuracy(original, digits) > 0.95
