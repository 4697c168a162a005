"""``distill()``: a complete, deterministic distillation run with early stopping.

1. The data set is read once into memory and split (seeded) into a training part and a
   held-back part of ``val_fraction``; the teacher's outputs are computed once (onnxruntime).
2. Adam trains the student through :class:`DistillationHook`, batch by batch (learning rate
   decayed to 0 over the epochs on a cosine by default; optionally on mixup blends of the
   inputs, which the teacher labels afresh), with a tqdm bar showing the running loss and
   top-1 agreement with the teacher.
3. After every epoch the held-back part is scored on the distillation loss (default) or on
   top-1 agreement with the teacher (``monitor="agreement"``, class-score outputs only),
   ties going to the other measure. The best weights so far are kept, the untrained ones
   counting as epoch 0, so the result is never worse on the held-back part than the input;
   ``patience`` epochs without improvement stop the run.
4. The best weights are exported, and the student before and after is scored with
   onnxruntime (the deployed runtime, not the torch interpreter) on the held-back part and on
   an optional evaluation set.

Runs are reproducible for a given seed: torch is seeded, deterministic algorithms are
requested, and torch runs on ``threads`` threads (1 by default: more is faster but may change
results in the last bits). Global torch settings are restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import torch
from tqdm import tqdm

from onnxshrink.data import LABELS_KEY, Sample
from onnxshrink.distill.hook import DistillationHook, ModelSource
from onnxshrink.distill.losses import distillation_loss
from onnxshrink.errors import ConfigError, DataError
from onnxshrink.runtime import make_session, run
from onnxshrink.verify import Fidelity, FidelityMeter

log = logging.getLogger(__name__)

Monitor = Literal["loss", "agreement"]
Schedule = Literal["cosine", "constant"]

#: distill() holds the data set in memory; refuse more than this.
MAX_DATA_BYTES = 4 * 2**30


@dataclass
class Arrays:
    """A data set in memory: stacked inputs, and labels when every sample has one."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def take(self, index: np.ndarray) -> Arrays:
        labels = self.labels[index] if self.labels is not None else None
        return Arrays({k: v[index] for k, v in self.feeds.items()}, labels)

    def batches(self, size: int) -> Iterator[tuple[slice, dict[str, np.ndarray], np.ndarray | None]]:
        for start in range(0, len(self), size):
            part = slice(start, start + size)
            labels = self.labels[part] if self.labels is not None else None
            yield part, {k: v[part] for k, v in self.feeds.items()}, labels


def stack_samples(samples: Iterable[Sample], *, max_bytes: int = MAX_DATA_BYTES) -> Arrays:
    """Read a data set into memory, concatenating samples along the batch axis."""
    columns: dict[str, list[np.ndarray]] = {}
    labels: list[int] | None = []
    total = 0
    for sample in samples:
        rows = {v.shape[0] if v.ndim else 1 for v in sample.feeds.values()}
        for name, value in sample.feeds.items():
            columns.setdefault(name, []).append(value if value.ndim else value.reshape(1))
            total += value.nbytes
        if labels is not None and sample.label is not None and rows == {1}:
            labels.append(sample.label)
        else:
            labels = None
        if total > max_bytes:
            raise DataError(
                f"the data set is over {max_bytes / 2**30:.1f} GiB; distillation keeps it in memory, "
                "give fewer samples"
            )
    if not columns:
        raise DataError("the data set holds no samples")
    feeds = {name: np.concatenate(parts, axis=0) for name, parts in columns.items()}
    return Arrays(feeds, np.asarray(labels, dtype=np.int64) if labels else None)


@dataclass
class EpochRecord:
    """One epoch: mean training loss, and the held-back score after it."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_agreement: float | None
    seconds: float


@dataclass
class SplitReport:
    """The student against the teacher on one split, before and after distillation."""

    name: str
    samples: int
    before: Fidelity
    after: Fidelity

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        }


@dataclass
class DistillResult:
    """What :func:`distill` did and what it produced."""

    model: onnx.ModelProto
    epochs_run: int
    best_epoch: int  # 0: no epoch beat the untrained student; it is returned unchanged
    stopped_early: bool
    train_samples: int
    val_samples: int
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)
    splits: list[SplitReport] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "train_samples": self.train_samples,
            "val_samples": self.val_samples,
            "seconds": round(self.seconds, 3),
            "history": [vars(r) for r in self.history],
            "splits": [s.to_json() for s in self.splits],
        }


@contextlib.contextmanager
def deterministic(seed: int, threads: int | None) -> Iterator[None]:
    """Seed torch, ask for deterministic algorithms and fix the thread count; restore after."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def _top1(output: np.ndarray) -> np.ndarray:
    return output.reshape(output.shape[0], -1).argmax(axis=1)


def _score(
    hook: DistillationHook, data: Arrays, teacher: list[np.ndarray], batch_size: int
) -> tuple[float, float | None]:
    """(mean distillation loss, top-1 agreement or None) of the torch student on ``data``."""
    kinds = hook.output_kinds([t[:1] for t in teacher])
    classify = kinds[0] != "regression"
    loss_sum, agree = 0.0, 0
    with torch.no_grad():
        for part, feeds, _ in data.batches(batch_size):
            student = list(hook.student(**feeds))
            targets = [torch.from_numpy(t[part]) for t in teacher]
            loss_sum += float(distillation_loss(student, targets, kinds, temperature=hook.temperature)) * len(
                targets[0]
            )
            if classify:
                agree += int(np.sum(_top1(student[0].cpu().numpy()) == _top1(teacher[0][part])))
    return loss_sum / len(data), (agree / len(data) if classify else None)


def _better(score: tuple[float, float | None], best: tuple[float, float | None], monitor: Monitor) -> bool:
    """Whether ``score`` beats ``best``: on ``monitor``, ties broken by the other measure."""
    loss, agreement = score
    if monitor == "agreement" and agreement is not None and best[1] is not None and agreement != best[1]:
        return agreement > best[1]
    if loss != best[0] or agreement is None or best[1] is None:
        return loss < best[0]
    return agreement > best[1]


def _fidelity(
    model: onnx.ModelProto, data: Arrays, teacher: list[np.ndarray], batch_size: int, threads: int | None
) -> Fidelity:
    """The student as onnxruntime runs it, against the teacher's outputs."""
    session = make_session(model, threads=threads)
    meter = FidelityMeter()
    for part, feeds, labels in data.batches(batch_size):
        outputs = run(session, feeds)
        for row in range(len(outputs[0])):
            label = int(labels[row]) if labels is not None else None
            meter.update(
                [t[part][row : row + 1] for t in teacher], [o[row : row + 1] for o in outputs], label
            )
    return meter.result()


def teacher_outputs(hook: DistillationHook, data: Arrays, batch_size: int) -> list[np.ndarray]:
    """The teacher's outputs for every sample of ``data``, stacked."""
    parts: list[list[np.ndarray]] = []
    for _, feeds, _ in data.batches(batch_size):
        parts.append(hook.teacher_outputs(feeds))
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def distill(
    teacher: ModelSource,
    student: ModelSource,
    dataset: Iterable[Sample],
    *,
    epochs: int = 10,
    lr: float = 1e-4,
    schedule: Schedule = "cosine",
    batch_size: int = 32,
    temperature: float = 4.0,
    alpha: float = 0.9,
    l1: float = 0.0,
    l2: float = 0.0,
    use_labels: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    patience: int = 3,
    monitor: Monitor = "loss",
    mixup: float = 0.0,
    eval_dataset: Iterable[Sample] | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> DistillResult:
    """Fine-tune ``student`` to match ``teacher`` on ``dataset`` (see the module docstring).

    Args:
        teacher, student: paths or protos; the student may be pruned and/or QDQ-quantized.
        dataset: samples (e.g. from :func:`onnxshrink.data.open_dataset`); labels optional.
        epochs: passes over the training part (0 only evaluates).
        lr: Adam learning rate.
        schedule: ``"cosine"`` decays the learning rate to 0 over ``epochs`` (by batch);
            ``"constant"`` keeps it.
        batch_size: samples per optimizer step.
        temperature, alpha, l1, l2: see :class:`DistillationHook`.
        use_labels: add the cross-entropy on the data set's labels (weight ``1 - alpha``).
        seed: seeds the split, the shuffling and torch.
        val_fraction: share of samples held back for early stopping and the report (0-1).
        patience: epochs without improvement before stopping; 0 never stops early.
        monitor: what the held-back split is scored on: ``"loss"`` (the distillation loss,
            smooth even on a few hundred samples) or ``"agreement"`` (top-1 agreement with
            the teacher, for class-score outputs; coarse on small splits). Ties go to the
            other measure.
        mixup: if > 0, blend every training batch with a shuffled copy of itself,
            ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(mixup, mixup)``, and let
            the teacher label the blend (run per batch instead of cached). The student then
            sees far more points of the teacher's function than the data set holds, which
            curbs over-fitting on small data sets. Not combinable with ``use_labels``.
        eval_dataset: an extra data set, only scored before and after.
        threads: torch and onnxruntime threads (``None``: their defaults).
        progress: show a tqdm progress bar on stderr.

    Returns:
        The tuned model (best held-back weights) and the before/after report.
    """
    _check_options(epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, patience=patience)
    if monitor not in ("loss", "agreement"):
        raise ConfigError(f"monitor must be 'loss' or 'agreement', not {monitor!r}")
    if mixup < 0:
        raise ConfigError(f"mixup must be >= 0, not {mixup}")
    if mixup and use_labels:
        raise ConfigError("mixup blends inputs, so their labels no longer apply: use one or the other")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    started = time.perf_counter()
    hook = DistillationHook(
        teacher, student, temperature=temperature, alpha=alpha, l1=l1, l2=l2, threads=threads
    )
    data = stack_samples(dataset)
    if use_labels and data.labels is None:
        raise DataError("training on labels (--labels) needs a data set where every sample has a label")
    train, val = _split(data, val_fraction, seed)
    if not use_labels:
        train = Arrays(train.feeds, None)
    teacher_train = teacher_outputs(hook, train, batch_size)
    teacher_val = teacher_outputs(hook, val, batch_size) if len(val) else []
    extra = stack_samples(eval_dataset) if eval_dataset is not None else None
    teacher_extra = teacher_outputs(hook, extra, batch_size) if extra is not None else []
    before_val = _fidelity(hook.student_model, val, teacher_val, batch_size, threads) if len(val) else None
    before_extra = (
        _fidelity(hook.student_model, extra, teacher_extra, batch_size, threads)
        if extra is not None
        else None
    )

    history: list[EpochRecord] = []
    best_epoch, stopped_early, epochs_run = 0, False, 0
    bar = tqdm(
        total=epochs * len(train), desc="distill", unit="sample", disable=not progress, dynamic_ncols=True
    )
    with deterministic(seed, threads), bar:
        optimizer = torch.optim.Adam(hook.parameters(), lr=lr)
        steps = epochs * -(-len(train) // batch_size)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
            if schedule == "cosine"
            else None
        )
        hook.output_kinds([t[:1] for t in teacher_train])
        best = _score(hook, val, teacher_val, batch_size) if len(val) else None
        best_state = _snapshot(hook)
        held_back = {"held-back": _percent(best[1])} if best is not None and best[1] is not None else {}
        trainer = _Trainer(hook, optimizer, scheduler, batch_size, np.random.default_rng(seed), mixup)
        for epoch in range(1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            record = trainer.epoch(train, teacher_train, epoch, bar, held_back)
            epochs_run = epoch
            if best is not None:
                score = _score(hook, val, teacher_val, batch_size)
                record.val_loss, record.val_agreement = score
                if score[1] is not None:
                    held_back = {"held-back": _percent(score[1])}
                if _better(score, best, monitor):
                    best, best_epoch, best_state = score, epoch, _snapshot(hook)
            else:
                best_epoch, best_state = epoch, _snapshot(hook)
            history.append(record)
            log.info("epoch %d: train loss %.4f, held-back %s", epoch, record.train_loss, _describe(record))
            if patience and epoch - best_epoch >= patience and epoch < epochs:
                stopped_early = True
                break
        _restore(hook, best_state)
    model = hook.model()
    splits = []
    if before_val is not None:
        splits.append(
            SplitReport(
                "held-back", len(val), before_val, _fidelity(model, val, teacher_val, batch_size, threads)
            )
        )
    if extra is not None and before_extra is not None:
        after_extra = _fidelity(model, extra, teacher_extra, batch_size, threads)
        splits.append(SplitReport("eval", len(extra), before_extra, after_extra))
    return DistillResult(
        model,
        epochs_run,
        best_epoch,
        stopped_early,
        len(train),
        len(val),
        time.perf_counter() - started,
        history,
        splits,
    )


def _check_options(*, epochs: int, lr: float, batch_size: int, val_fraction: float, patience: int) -> None:
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, not {epochs}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, not {lr}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, not {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val fraction must be in [0, 1), not {val_fraction}")
    if patience < 0:
        raise ConfigError(f"patience must be >= 0, not {patience}")


def _split(data: Arrays, val_fraction: float, seed: int) -> tuple[Arrays, Arrays]:
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = round(len(data) * val_fraction)
    if val_fraction > 0 and len(data) > 1:
        n_val = max(n_val, 1)
    if n_val >= len(data):
        raise DataError(f"{len(data)} sample(s) leave nothing to train on after holding back {n_val}")
    return data.take(np.sort(order[n_val:])), data.take(np.sort(order[:n_val]))


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@dataclass
class _Trainer:
    """The optimizer side of a run: one call of :meth:`epoch` per pass over the data."""

    hook: DistillationHook
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    batch_size: int
    rng: np.random.Generator
    mixup: float = 0.0

    def _mixed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Blend the batch with a shuffled copy of itself (float inputs only)."""
        lam = float(self.rng.beta(self.mixup, self.mixup))
        perm = self.rng.permutation(len(next(iter(feeds.values()))))
        return {
            k: (lam * v + (1.0 - lam) * v[perm]).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in feeds.items()
        }

    def epoch(
        self, train: Arrays, teacher: list[np.ndarray], epoch: int, bar: tqdm, extra: dict[str, str]
    ) -> EpochRecord:
        """One pass over ``train`` in a seeded order; the bar shows loss and teacher agreement."""
        started = time.perf_counter()
        order = self.rng.permutation(len(train))
        shuffled, targets = train.take(order), [t[order] for t in teacher]
        loss_sum, agree, seen = 0.0, 0, 0
        hook = self.hook
        classify = hook.kinds is not None and hook.kinds[0] != "regression"
        for part, feeds, labels in shuffled.batches(self.batch_size):
            batch: dict[str, Any] = dict(feeds)
            if labels is not None:
                batch[LABELS_KEY] = labels
            # Mixed inputs are new points of the teacher's function: it labels them afresh.
            cached = [t[part] for t in targets]
            if self.mixup:
                batch, cached = {**batch, **self._mixed(feeds)}, None
            self.optimizer.zero_grad(set_to_none=True)
            terms = hook.losses(batch, cached)
            terms.total.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            rows = len(terms.teacher_outputs[0])
            loss_sum += float(terms.total.detach()) * rows
            seen += rows
            postfix = {"loss": f"{loss_sum / seen:.4f}"}
            if classify:
                student_top1 = _top1(terms.student_outputs[0].detach().cpu().numpy())
                agree += int(np.sum(student_top1 == _top1(terms.teacher_outputs[0])))
                postfix["agree"] = _percent(agree / seen)
            bar.set_postfix({**postfix, **extra}, refresh=False)
            bar.update(rows)
        return EpochRecord(epoch, loss_sum / max(seen, 1), None, None, time.perf_counter() - started)


def _describe(record: EpochRecord) -> str:
    if record.val_agreement is not None:
        return f"agreement {100 * record.val_agreement:.2f}%, loss {record.val_loss:.4f}"
    return f"loss {record.val_loss:.4f}" if record.val_loss is not None else "-"


def _snapshot(hook: DistillationHook) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hook.student.weights.items()}


def _restore(hook: DistillationHook, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in state.items():
            hook.student.weights[key].copy_(value)
