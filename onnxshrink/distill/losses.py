"""Distillation losses.

For an output that looks like class scores (``[batch, classes]``, or ``[batch, classes, 1, 1]``)
the loss is Hinton's soft-target term,

    KL(softmax(t / T) || softmax(s / T)) * T**2    (mean over the batch),

where ``t``/``s`` are the teacher's/student's logits and ``T`` the temperature; the ``T**2``
keeps gradient magnitudes independent of ``T``. Outputs that are already probabilities
(non-negative rows summing to 1, e.g. a graph ending in Softmax) are turned back into logits
with ``log``. Any other output (features, boxes, masks) is matched with mean squared error.
Per-output terms are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onnxshrink.verify import looks_like_class_scores

OutputKind = Literal["logits", "probabilities", "regression"]


def output_kind(teacher_output: np.ndarray) -> OutputKind:
    """How an output is compared: class scores (as logits or probabilities) or values."""
    if not looks_like_class_scores(teacher_output):
        return "regression"
    rows = teacher_output.reshape(teacher_output.shape[0], -1).astype(np.float64)
    if np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities"
    return "logits"


def as_logits(x: Tensor, kind: OutputKind) -> Tensor:
    """``[batch, classes]`` logits from a class-score output."""
    flat = x.reshape(x.shape[0], -1)
    return torch.log(flat.clamp_min(1e-12)) if kind == "probabilities" else flat


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL divergence of the student's tempered softmax from the teacher's, times T**2."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], kinds: Sequence[OutputKind], *, temperature: float
) -> Tensor:
    """The sum over outputs of the soft-target loss (class scores) or MSE (anything else)."""
    total = student[0].new_zeros(())
    for s, t, kind in zip(student, teacher, kinds):
        if kind == "regression":
            total = total + F.mse_loss(s.float(), t.float())
        else:
            total = total + soft_target_loss(
                as_logits(s.float(), kind), as_logits(t.float(), kind), temperature
            )
    return total


def label_loss(student: Sequence[Tensor], kinds: Sequence[OutputKind], labels: Tensor) -> Tensor:
    """Cross-entropy of the first class-score output against integer labels."""
    index = kinds.index("logits") if "logits" in kinds else kinds.index("probabilities")
    return F.cross_entropy(as_logits(student[index].float(), kinds[index]), labels.reshape(-1).long())
