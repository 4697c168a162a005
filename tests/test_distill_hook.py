"""DistillationHook: losses, parameters and safe export; teacher outputs from real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
import torch.nn.functional as F
from conftest import write_model

from onnxshrink.distill.hook import DistillationHook
from onnxshrink.distill.losses import output_kind
from onnxshrink.errors import ConfigError, DataError, ModelSaveError, UnsupportedModelError
from onnxshrink.modelio import load_model
from onnxshrink.testing import conv_net, run_ort


def perturbed(model: onnx.ModelProto, scale: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose float weights got seeded multiplicative noise."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32 and "var" not in t.name:
            t.CopyFrom(
                numpy_helper.from_array(
                    (w * (1 + scale * rng.standard_normal(w.shape))).astype(np.float32), t.name
                )
            )
    return out


@pytest.fixture
def pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    teacher = conv_net(channels=(3, 8, 16), size=12, seed=1)
    return teacher, perturbed(teacher, 0.5)


@pytest.fixture
def batch() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)}


def test_loss_is_tempered_kl_times_t_squared(pair, batch) -> None:
    teacher, student = pair
    hook = DistillationHook(teacher, student, temperature=3.0)
    t = torch.from_numpy(run_ort(teacher, batch)[0])
    s = torch.from_numpy(run_ort(student, batch)[0])
    p = F.softmax(t / 3.0, dim=1)
    expected = (p * (p.log() - F.log_softmax(s / 3.0, dim=1))).sum(1).mean() * 9.0
    terms = hook.losses(batch)
    torch.testing.assert_close(terms.total, expected, rtol=1e-4, atol=1e-6)
    assert hook.kinds == ["logits"] and terms.labels is None


def test_labels_add_cross_entropy_weighted_by_one_minus_alpha(pair, batch) -> None:
    teacher, student = pair
    labels = np.asarray([0, 1, 2, 3, 4, 5])
    hook = DistillationHook(teacher, student, alpha=0.75)
    plain = hook.losses(batch)
    mixed = hook.losses({**batch, "labels": labels})
    s = torch.from_numpy(run_ort(student, batch)[0])
    ce = F.cross_entropy(s, torch.from_numpy(labels))
    torch.testing.assert_close(mixed.total, 0.75 * plain.total + 0.25 * ce, rtol=1e-4, atol=1e-6)


def test_l1_l2_regularization(pair, batch) -> None:
    teacher, student = pair
    base = DistillationHook(teacher, student).loss(batch)
    hook = DistillationHook(teacher, student, l1=1e-3, l2=1e-2)
    weights = [hook.student.weight(name) for name, _ in hook.student.named_weights()]
    expected = base + sum(1e-3 * w.abs().sum() + 1e-2 * (w * w).sum() for w in weights)
    torch.testing.assert_close(hook.loss(batch), expected, rtol=1e-5, atol=1e-6)


def test_gradient_step_reduces_the_loss(pair, batch) -> None:
    hook = DistillationHook(*pair)
    optimizer = torch.optim.Adam(hook.parameters(), lr=1e-2)
    first = float(hook.loss(batch).detach())
    for _ in range(5):
        optimizer.zero_grad()
        hook.loss(batch).backward()
        optimizer.step()
    assert float(hook.loss(batch).detach()) < first


def test_torch_tensors_work_as_batch_values(pair, batch) -> None:
    hook = DistillationHook(*pair)
    a = hook.loss(batch)
    b = hook.loss({"input": torch.from_numpy(batch["input"]), "labels": torch.zeros(6, dtype=torch.long)})
    assert a.shape == () and b.shape == ()


def feature_model(softmax: bool) -> onnx.ModelProto:
    """One Conv; output a feature map (regression) or softmax probabilities."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w"], ["f"], pads=[1, 1, 1, 1])]
    out = "f"
    if softmax:
        nodes += [
            helper.make_node("GlobalAveragePool", ["f"], ["g"]),
            helper.make_node("Flatten", ["g"], ["h"]),
            helper.make_node("Softmax", ["h"], ["p"]),
        ]
        out = "p"
    graph = helper.make_graph(
        nodes,
        "f",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 2, 5, 5])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_feature_outputs_use_mse_and_probabilities_are_recognised() -> None:
    x = {"input": np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)}
    teacher = feature_model(False)
    hook = DistillationHook(teacher, perturbed(teacher, 0.3))
    loss = hook.loss(x)
    assert hook.kinds == ["regression"]
    expected = F.mse_loss(
        torch.from_numpy(run_ort(hook.student_model, x)[0]), torch.from_numpy(run_ort(teacher, x)[0])
    )
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert output_kind(run_ort(feature_model(True), x)[0]) == "probabilities"
    with pytest.raises(DataError, match="class scores"):
        hook.loss({**x, "labels": np.zeros(3, np.int64)})


def test_bad_batches_and_options_are_clear_errors(pair, batch) -> None:
    hook = DistillationHook(*pair)
    with pytest.raises(DataError, match="not model inputs"):
        hook.loss({**batch, "label": np.zeros(6)})
    with pytest.raises(DataError, match="lacks model input"):
        hook.loss({"labels": np.zeros(6)})
    for kwargs in ({"temperature": 0.0}, {"alpha": 1.5}, {"l2": -1.0}):
        with pytest.raises(ConfigError):
            DistillationHook(*pair, **kwargs)


def test_teacher_and_student_must_share_an_interface(pair) -> None:
    other = conv_net(channels=(3, 4), size=12, seed=2)
    other.graph.input[0].name = "pixels"
    other.graph.node[0].input[0] = "pixels"
    with pytest.raises(UnsupportedModelError, match="inputs"):
        DistillationHook(pair[0], other)


def test_export_is_atomic_and_never_overwrites_inputs(tmp_path: Path, pair, batch) -> None:
    teacher_path = write_model(pair[0], tmp_path / "teacher.onnx")
    student_path = write_model(pair[1], tmp_path / "student.onnx")
    hook = DistillationHook(str(teacher_path), str(student_path))
    before = (teacher_path.read_bytes(), student_path.read_bytes())
    for target in (teacher_path, student_path):
        with pytest.raises(ModelSaveError, match="overwrite"):
            hook.export(target)
    assert (teacher_path.read_bytes(), student_path.read_bytes()) == before
    out = hook.export(tmp_path / "tuned.onnx")
    reloaded, _ = load_model(out)
    np.testing.assert_array_equal(run_ort(reloaded, batch)[0], run_ort(pair[1], batch)[0])
