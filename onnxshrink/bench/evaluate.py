"""Feeding data to the models: batching samples, and accuracy/fidelity over a data set.

Top-1/top-5 accuracy needs labels and class scores (a ``[batch, classes]`` first output);
fidelity (SQNR, cosine, top-1 agreement with the baseline) comes from
:class:`onnxshrink.verify.FidelityMeter` and needs neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np

from onnxshrink.data import Dataset
from onnxshrink.errors import DataError
from onnxshrink.runtime import run
from onnxshrink.verify import FidelityMeter, looks_like_class_scores


def batches(
    dataset: Dataset, batch: int, *, fixed_batch: bool
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """Samples stacked ``batch`` at a time along axis 0, with their labels."""
    pending: list[Any] = []
    for sample in dataset:
        pending.append(sample)
        if len(pending) == batch:
            yield stack(pending)
            pending = []
    if pending and not fixed_batch:
        yield stack(pending)


def stack(samples: list[Any]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if len(samples) == 1:
        feeds = samples[0].feeds
    else:
        try:
            feeds = {k: np.concatenate([s.feeds[k] for s in samples], axis=0) for k in samples[0].feeds}
        except ValueError as exc:
            raise DataError(f"samples of different shapes cannot be batched ({exc}); use --batch 1") from None
    labels = None if samples[0].label is None else np.concatenate([np.atleast_1d(s.label) for s in samples]).astype(np.int64)
    return feeds, labels


def take_batches(
    dataset: Dataset, group: int, count: int, fixed_batch: bool
) -> list[tuple[dict[str, np.ndarray], Any]]:
    out = []
    for item in batches(dataset, group, fixed_batch=fixed_batch):
        out.append(item)
        if len(out) >= count:
            break
    if not out:
        raise DataError("no complete batch of samples to time", path=getattr(dataset, "source", None))
    return out


def evaluate(
    sessions: list[Any],
    dataset: Dataset,
    group: int,
    *,
    fixed_batch: bool,
    data_kind: str,
    step: Callable[[], None],
) -> tuple[list[dict[str, Any] | None], list[FidelityMeter], int]:
    """Top-1/top-5 per model (with labels) and a fidelity meter per candidate."""
    meters = [FidelityMeter() for _ in sessions[1:]]
    correct = np.zeros((len(sessions), 2), dtype=np.int64)  # top-1, top-5 hits
    rows = labelled = classes = 0
    classify: bool | None = None
    for feed, labels in batches(dataset, group, fixed_batch=fixed_batch):
        outs = [run(session, feed) for session in sessions]
        for meter, out in zip(meters, outs[1:]):
            # FidelityMeter compares one label with each row's top-1; an array does the same per row.
            meter.update(
                outs[0],
                out,
                label=None if labels is None else cast(int, labels if len(labels) > 1 else int(labels[0])),
            )
        if classify is None:
            classify = looks_like_class_scores(np.asarray(outs[0][0]))
        rows += int(np.asarray(outs[0][0]).shape[0]) if np.asarray(outs[0][0]).ndim else 1
        if labels is not None and classify:
            labelled += len(labels)
            for k, out in enumerate(outs):
                scores = np.asarray(out[0]).reshape(len(labels), -1)
                classes = scores.shape[1]
                top = min(5, scores.shape[1])
                best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
                correct[k, 0] += int(np.sum(best[:, 0] == labels))
                correct[k, 1] += int(np.sum(np.any(best == labels[:, None], axis=1)))
        step()
    if data_kind != "labelled" or not classify or not labelled:
        return [None] * len(sessions), meters, rows
    accuracy: list[dict[str, Any] | None] = [
        {
            "top1": float(correct[k, 0] / labelled),
            "top5": float(correct[k, 1] / labelled) if classes > 5 else None,
            "samples": labelled,
        }
        for k in range(len(sessions))
    ]
    return accuracy, meters, rows
