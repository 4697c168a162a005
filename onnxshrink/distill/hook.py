"""DistillationHook: the loss of a student ONNX model against a teacher, for any torch loop.

::

    hook = DistillationHook(teacher="fp32.onnx", student="pruned.onnx", temperature=4.0, alpha=0.9)
    optimizer = torch.optim.Adam(hook.parameters(), lr=1e-4)
    for batch in batches:                      # {"input": array, optionally "labels": array}
        optimizer.zero_grad()
        hook.loss(batch).backward()
        optimizer.step()
    hook.export("tuned.onnx")

The teacher runs in onnxruntime (no gradients needed); the student is a :class:`TorchGraph`.
The loss is ``alpha * distillation + (1 - alpha) * cross_entropy(labels)`` when the batch has
``labels`` and plain ``distillation`` when it has not, plus ``l1 * sum|w| + l2 * sum w**2``
over the trainable weights (see :mod:`onnxshrink.distill.losses`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from onnxshrink.data import LABELS_KEY
from onnxshrink.distill.graph import TorchGraph
from onnxshrink.distill.losses import OutputKind, distillation_loss, label_loss, output_kind
from onnxshrink.errors import ConfigError, DataError, ModelSaveError, UnsupportedModelError
from onnxshrink.modelio import load_model, save_model
from onnxshrink.runtime import make_session, run

ModelSource = str | os.PathLike[str] | onnx.ModelProto
Batch = Mapping[str, np.ndarray | Tensor]


@dataclass
class LossTerms:
    """One batch's loss and its parts (the parts detached, for logging)."""

    total: Tensor
    distillation: float
    labels: float | None
    regularization: float
    student_outputs: list[Tensor]
    teacher_outputs: list[np.ndarray]


def _to_numpy(value: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def _source(model: ModelSource, *, load_weights: bool) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    proto, _ = load_model(model, load_weights=load_weights)
    return proto, Path(model)


class DistillationHook:
    """Loss and export for distilling ``teacher`` into ``student`` (see the module docstring).

    Args:
        teacher: the reference model (path or proto); run by onnxruntime.
        student: the model to fine-tune (path or proto); same inputs and outputs as the teacher.
        temperature: softmax temperature of the soft-target loss (> 0).
        alpha: weight of the distillation term when a batch has labels (0-1).
        l2, l1: weight-regularization strengths (>= 0).
        threads: onnxruntime intra-op threads for the teacher (``None``: onnxruntime decides).
        frozen: student initializer names to keep fixed.
        keep_sparsity: keep the zeros of pruned student weights at zero.

    Raises:
        ConfigError: a bad hyper-parameter.
        UnsupportedModelError: the models' interfaces differ, or the student uses an op
            TorchGraph cannot run.
    """

    def __init__(
        self,
        teacher: ModelSource,
        student: ModelSource,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        l2: float = 0.0,
        l1: float = 0.0,
        threads: int | None = 1,
        frozen: Collection[str] = (),
        keep_sparsity: bool = True,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, not {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be between 0 and 1, not {alpha}")
        if l1 < 0 or l2 < 0:
            raise ConfigError("l1 and l2 must be >= 0")
        self.temperature, self.alpha, self.l1, self.l2 = (
            float(temperature),
            float(alpha),
            float(l1),
            float(l2),
        )
        # A teacher file is vetted by modelio, then read by onnxruntime itself (its weights
        # are never held twice); a student is loaded fully, to train.
        teacher_proto, self.teacher_path = _source(teacher, load_weights=False)
        self.student_model, self.student_path = _source(student, load_weights=True)
        self._check_interfaces(teacher_proto, self.student_model)
        self.session = make_session(
            teacher_proto if self.teacher_path is None else self.teacher_path, threads=threads
        )
        del teacher_proto
        self.student = TorchGraph(self.student_model, frozen=frozen, keep_sparsity=keep_sparsity)
        self.kinds: list[OutputKind] | None = None

    @staticmethod
    def _check_interfaces(teacher: onnx.ModelProto, student: onnx.ModelProto) -> None:
        def names(values: Any, model: onnx.ModelProto) -> list[str]:
            inits = {t.name for t in model.graph.initializer}
            return [v.name for v in values if v.name not in inits]

        t_in, s_in = names(teacher.graph.input, teacher), names(student.graph.input, student)
        if sorted(t_in) != sorted(s_in):
            raise UnsupportedModelError(f"teacher inputs {t_in} differ from student inputs {s_in}")
        if len(teacher.graph.output) != len(student.graph.output):
            raise UnsupportedModelError(
                f"teacher has {len(teacher.graph.output)} output(s), student {len(student.graph.output)}"
            )

    # ------------------------------------------------------------------ batches

    @property
    def input_names(self) -> list[str]:
        return self.student.input_names

    def _split(self, batch: Batch) -> tuple[dict[str, np.ndarray | Tensor], Tensor | None]:
        unknown = sorted(set(batch) - set(self.input_names) - {LABELS_KEY})
        if unknown:
            raise DataError(
                f"batch has entries {unknown} that are not model inputs {self.input_names} or '{LABELS_KEY}'"
            )
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise DataError(f"batch lacks model input(s) {missing}")
        labels = batch.get(LABELS_KEY)
        label_tensor = None
        if labels is not None:
            label_tensor = torch.as_tensor(_to_numpy(labels)).long().to(self.student.device)
        return {n: batch[n] for n in self.input_names}, label_tensor

    def teacher_outputs(self, feeds: Mapping[str, np.ndarray | Tensor]) -> list[np.ndarray]:
        """The teacher's outputs for one batch (onnxruntime)."""
        return run(self.session, {n: _to_numpy(feeds[n]) for n in self.input_names})

    def output_kinds(self, teacher_outputs: Sequence[np.ndarray]) -> list[OutputKind]:
        """How each output is compared; decided on the first batch and then kept."""
        if self.kinds is None:
            self.kinds = [output_kind(t) for t in teacher_outputs]
        return self.kinds

    # ------------------------------------------------------------------ losses

    def losses(self, batch: Batch, teacher_outputs: Sequence[np.ndarray] | None = None) -> LossTerms:
        """The loss of one batch and its parts; ``teacher_outputs`` skips running the teacher."""
        feeds, labels = self._split(batch)
        teacher = list(teacher_outputs) if teacher_outputs is not None else self.teacher_outputs(feeds)
        kinds = self.output_kinds(teacher)
        student = list(self.student(**feeds))
        device = student[0].device
        targets = [torch.from_numpy(np.asarray(t)).to(device) for t in teacher]
        distill = distillation_loss(student, targets, kinds, temperature=self.temperature)
        total = distill
        label_value = None
        if labels is not None:
            if not any(k != "regression" for k in kinds):
                raise DataError("the batch has labels but no model output looks like class scores")
            ce = label_loss(student, kinds, labels)
            total = self.alpha * distill + (1.0 - self.alpha) * ce
            label_value = float(ce.detach())
        reg = self.regularization()
        if self.l1 or self.l2:
            total = total + reg
        return LossTerms(total, float(distill.detach()), label_value, float(reg.detach()), student, teacher)

    def loss(self, batch: Batch, teacher_outputs: Sequence[np.ndarray] | None = None) -> Tensor:
        """The scalar loss of one batch, ready for ``backward()``."""
        return self.losses(batch, teacher_outputs).total

    def regularization(self) -> Tensor:
        """``l1 * sum|w| + l2 * sum w**2`` over the trainable (masked) weights."""
        total = torch.zeros((), device=self.student.device)
        if not (self.l1 or self.l2):
            return total
        for name, _ in self.student.named_weights():
            w = self.student.weight(name)
            if self.l1:
                total = total + self.l1 * w.abs().sum()
            if self.l2:
                total = total + self.l2 * (w * w).sum()
        return total

    # ------------------------------------------------------------------ parameters / export

    def parameters(self) -> Iterator[nn.Parameter]:
        """The student's trainable weights, for any torch optimizer."""
        return self.student.parameters()

    def model(self) -> onnx.ModelProto:
        """The student with its current weights, as an ONNX model."""
        return self.student.export(self.student_model)

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the tuned student to ``path`` atomically (never over the teacher or student)."""
        return save_distilled(
            self.model(), path, protect=[p for p in (self.teacher_path, self.student_path) if p]
        )


def save_distilled(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, protect: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """Save through :func:`onnxshrink.modelio.save_model`, refusing to overwrite ``protect``."""
    target = Path(path)
    for source in protect:
        try:
            same = target.exists() and os.path.samefile(target, source)
        except OSError:
            same = False
        if same:
            raise ModelSaveError("output would overwrite an input model; choose another -o path", path=target)
    return save_model(model, target, input_path=protect[0] if protect else None)
