"""distill(): a short, real distillation run recovers a damaged student, deterministically."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from conftest import SAMPLES
from test_distill_hook import perturbed

from onnxshrink.data import Sample, open_dataset
from onnxshrink.distill.loop import distill, stack_samples
from onnxshrink.errors import ConfigError, DataError
from onnxshrink.modelio import load_model
from onnxshrink.testing import conv_net


def magnitude_pruned(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """Zero the smallest ``sparsity`` share of every Conv weight."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv_weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    for t in out.graph.initializer:
        if t.name in conv_weights:
            w = numpy_helper.to_array(t).copy()
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def random_samples(count: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample({"input": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}) for _ in range(count)]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_distillation_recovers_a_pruned_sample_model() -> None:
    path = SAMPLES / "resnet_mini.onnx"
    if not path.is_file() or not (SAMPLES / "digits_train.npz").is_file():
        pytest.skip("sample model or data not built yet")
    teacher, _ = load_model(path)
    student = magnitude_pruned(teacher, 0.6)
    data = open_dataset(SAMPLES / "digits_train.npz", teacher).take(480)
    result = distill(
        teacher,
        student,
        data,
        epochs=2,
        lr=1e-3,
        batch_size=32,
        seed=0,
        val_fraction=0.2,
        patience=0,
        progress=False,
    )
    held_back = result.splits[0]
    assert held_back.name == "held-back" and held_back.samples == 96
    assert held_back.after.top1_agreement >= held_back.before.top1_agreement + 0.2
    assert held_back.after.top1_agreement >= 0.85
    assert held_back.before.accuracy_reference is not None  # labels are reported, not trained on
    pruned, tuned = weights(student), weights(result.model)
    for name, w in pruned.items():
        if w.ndim == 4:
            assert np.all(tuned[name][w == 0] == 0), f"{name}: pruned weights must stay zero"


def test_distillation_improves_a_noisy_student_and_is_deterministic() -> None:
    teacher = conv_net(channels=(3, 8, 16), size=12, seed=1)
    student = perturbed(teacher, 0.6, seed=3)
    kwargs = {
        "epochs": 3,
        "lr": 3e-3,
        "batch_size": 16,
        "seed": 7,
        "val_fraction": 0.25,
        "patience": 0,
        "progress": False,
    }
    first = distill(teacher, student, random_samples(96), eval_dataset=random_samples(32, seed=9), **kwargs)
    second = distill(teacher, student, random_samples(96), eval_dataset=random_samples(32, seed=9), **kwargs)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert [s.name for s in first.splits] == ["held-back", "eval"]
    for split in first.splits:
        assert split.after.sqnr_db > split.before.sqnr_db + 3
    assert first.epochs_run == 3 and len(first.history) == 3 and first.train_samples == 72


def test_best_weights_are_restored_so_the_result_is_never_worse() -> None:
    teacher = conv_net(channels=(3, 8), size=12, seed=2)
    # A perfect student: every step of a huge learning rate can only hurt it.
    result = distill(
        teacher, teacher, random_samples(40), epochs=5, lr=1.0, batch_size=8, patience=2, progress=False
    )
    assert result.best_epoch == 0 and result.stopped_early and result.epochs_run == 2
    assert result.model.SerializeToString() == teacher.SerializeToString()


def test_zero_epochs_only_evaluates_and_no_split_trains_on_everything() -> None:
    teacher = conv_net(channels=(3, 4), size=12, seed=3)
    student = perturbed(teacher, 0.2)
    result = distill(teacher, student, random_samples(10), epochs=0, progress=False)
    assert result.epochs_run == 0 and result.model.SerializeToString() == student.SerializeToString()
    result = distill(teacher, student, random_samples(10), epochs=1, val_fraction=0.0, progress=False)
    assert (
        result.train_samples == 10
        and result.val_samples == 0
        and result.best_epoch == 1
        and not result.splits
    )


def test_mixup_trains_on_teacher_labelled_blends() -> None:
    teacher = conv_net(channels=(3, 8), size=12, seed=5)
    student = perturbed(teacher, 0.5, seed=1)
    kwargs = {"epochs": 2, "lr": 3e-3, "batch_size": 8, "mixup": 1.0, "patience": 0, "progress": False}
    first = distill(teacher, student, random_samples(32), **kwargs)
    second = distill(teacher, student, random_samples(32), **kwargs)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.splits[0].after.sqnr_db > first.splits[0].before.sqnr_db
    with pytest.raises(ConfigError, match="mixup"):
        distill(teacher, student, [Sample(s.feeds, 1) for s in random_samples(8)], mixup=1.0, use_labels=True)


def test_option_and_data_errors() -> None:
    teacher = conv_net(channels=(3, 4), size=12, seed=4)
    with pytest.raises(DataError, match="label"):
        distill(teacher, teacher, random_samples(8), use_labels=True, progress=False)
    with pytest.raises(ConfigError, match="val fraction"):
        distill(teacher, teacher, random_samples(8), val_fraction=1.0, progress=False)
    with pytest.raises(DataError, match="nothing to train"):
        distill(teacher, teacher, random_samples(2), val_fraction=0.9, progress=False)
    with pytest.raises(DataError, match="no samples"):
        stack_samples([])


def test_monitor_picks_the_measure_that_decides() -> None:
    from onnxshrink.distill.loop import _better

    best = (0.50, 0.90)
    assert _better((0.40, 0.89), best, "loss") and not _better((0.40, 0.89), best, "agreement")
    assert _better((0.60, 0.91), best, "agreement") and not _better((0.60, 0.91), best, "loss")
    assert _better((0.50, 0.91), best, "loss") and _better((0.40, 0.90), best, "agreement")
    assert _better((0.40, None), (0.50, None), "agreement")
    with pytest.raises(ConfigError, match="monitor"):
        distill(conv_net(channels=(3, 4), size=12), conv_net(channels=(3, 4), size=12), [], monitor="acc")  # type: ignore[arg-type]
