"""``onnxshrink distill``: fine-tune a pruned or quantized student against its fp32 teacher.

torch is imported only when the command runs (it is the optional ``train`` extra), so
``onnxshrink --help`` works without it and a missing torch is a one-line error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from onnxshrink.cli._options import MODEL_PATH, echo_json, json_option
from onnxshrink.data import DataOptions, open_dataset
from onnxshrink.errors import ModelSaveError
from onnxshrink.modelio import check_output_path, load_model
from onnxshrink.runtime import check_onnxruntime_survives
from onnxshrink.report import format_table, section

if TYPE_CHECKING:
    from onnxshrink.distill.loop import DistillResult

SCHEMA = "onnxshrink.distill/1"
DATA_HELP = "a .npz (keys = input names, optional 'labels'), a folder of .npz, an image folder, or 'random'"


@click.command("distill")
@click.option(
    "--teacher", required=True, type=MODEL_PATH, help="The reference model (usually the fp32 original)."
)
@click.option(
    "--student", required=True, type=MODEL_PATH, help="The model to fine-tune (pruned and/or QDQ int8)."
)
@click.option("--data", required=True, metavar="DATA", help=f"Training inputs: {DATA_HELP}.")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the tuned student."
)
@click.option(
    "--eval", "eval_data", metavar="DATA", help="Extra data scored before and after (never trained on)."
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Most passes over the training data.",
)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Adam learning rate.",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Samples per optimizer step."
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, min_open=True),
    default=4.0,
    show_default=True,
    help="Softmax temperature of the distillation loss.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.9,
    show_default=True,
    help="Weight of distillation vs. label cross-entropy (with --labels).",
)
@click.option(
    "--labels/--no-labels",
    default=False,
    show_default=True,
    help="Also train on the data's labels (cross-entropy, weight 1-alpha).",
)
@click.option(
    "--l1", type=click.FloatRange(0), default=0.0, show_default=True, help="L1 weight regularization."
)
@click.option(
    "--l2", type=click.FloatRange(0), default=0.0, show_default=True, help="L2 weight regularization."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the split, the shuffling and torch."
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of the data held back for early stopping and the report.",
)
@click.option(
    "--patience",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="Epochs without held-back improvement before stopping (0: never).",
)
@click.option(
    "--mixup",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    metavar="ALPHA",
    help="Train on blends of input pairs (weight ~ Beta(ALPHA, ALPHA)) labelled by the teacher; "
    "helps small data sets. 0: off.",
)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "constant"]),
    default="cosine",
    show_default=True,
    help="Learning rate over the run: cosine decay to 0 over --epochs, or constant.",
)
@click.option(
    "--monitor",
    type=click.Choice(["loss", "agreement"]),
    default="loss",
    show_default=True,
    help="Held-back score that picks the best epoch: distillation loss, or top-1 agreement with the teacher.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="CPU threads (more is faster, results may differ in the last bits).",
)
@json_option
def distill(
    teacher: str,
    student: str,
    data: str,
    output: str,
    eval_data: str | None,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    alpha: float,
    labels: bool,
    l1: float,
    l2: float,
    seed: int,
    val_fraction: float,
    patience: int,
    mixup: float,
    schedule: str,
    monitor: str,
    threads: int,
    as_json: bool,
) -> None:
    """Fine-tune STUDENT to match TEACHER on DATA by knowledge distillation; write OUTPUT.

    \b
    No training code is needed: the student's ONNX graph is trained directly (PyTorch, the
    'train' extra), pruned weights stay zero, QDQ int8 students train as fake-quant and are
    written back as QDQ. Labels are optional. The weights that score best on the held-back
    split (--monitor) are kept, the untrained student's included, so the output never
    scores worse there than the student.

    \b
    Examples:
      onnxshrink distill --teacher fp32.onnx --student pruned.onnx --data train.npz -o tuned.onnx
      onnxshrink distill --teacher fp32.onnx --student int8.onnx --data train.npz --eval eval.npz \\
          --epochs 5 --lr 1e-4 --json
    """
    from onnxshrink.distill.hook import save_distilled
    from onnxshrink.distill.loop import distill as run_distill

    _check_output(output, [teacher, student])
    student_model, _ = load_model(student)
    load_model(teacher, load_weights=False)  # vetted before onnxruntime sees it (the student is, above)
    for path in (teacher, student):  # a model that crashes onnxruntime: one line, not a segfault
        check_onnxruntime_survives(path)
    options = DataOptions(seed=seed)
    dataset = open_dataset(data, student_model, options)
    eval_dataset = open_dataset(eval_data, student_model, options) if eval_data else None
    result = run_distill(
        teacher,
        student_model,
        dataset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        temperature=temperature,
        alpha=alpha,
        l1=l1,
        l2=l2,
        use_labels=labels,
        seed=seed,
        val_fraction=val_fraction,
        patience=patience,
        monitor="agreement" if monitor == "agreement" else "loss",
        schedule="constant" if schedule == "constant" else "cosine",
        mixup=mixup,
        eval_dataset=eval_dataset,
        threads=threads,
        progress=not as_json and sys.stderr.isatty(),
    )
    written = save_distilled(result.model, output, protect=[student, teacher])
    if as_json:
        echo_json(
            {
                "schema": SCHEMA,
                "teacher": teacher,
                "student": student,
                "output": str(written),
                **result.to_json(),
            }
        )
    else:
        click.echo(render(result, teacher=teacher, student=student, output=str(written)))


def _check_output(output: str, inputs: list[str]) -> None:
    """Fail before training, not after it, when OUTPUT cannot be written."""
    path = Path(output)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError("output folder does not exist", path=path)
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ModelSaveError("output would overwrite an input model; choose another -o path", path=path)
    check_output_path(path)  # a symbolic link, a non-file or an unwritable folder: before training


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(result: DistillResult, *, teacher: str, student: str, output: str) -> str:
    """The terminal report: before/after agreement and accuracy per split."""
    stop = "stopped early" if result.stopped_early else "all epochs"
    best = "kept the untrained student" if result.best_epoch == 0 else f"best epoch {result.best_epoch}"
    lines = [
        f"teacher {teacher}",
        f"student {student} -> {output}",
        (
            f"trained on {result.train_samples} samples, {result.val_samples} held back; "
            f"{result.epochs_run} epoch(s) run ({stop}), {best}; {result.seconds:.1f} s"
        ),
    ]
    rows = []
    for split in result.splits:
        b, a = split.before, split.after
        rows.append(
            (
                split.name,
                split.samples,
                "top-1 agreement with teacher",
                _pct(b.top1_agreement),
                _pct(a.top1_agreement),
            )
        )
        if b.accuracy_candidate is not None:
            rows.append(
                (
                    split.name,
                    split.samples,
                    f"accuracy (teacher {_pct(b.accuracy_reference)})",
                    _pct(b.accuracy_candidate),
                    _pct(a.accuracy_candidate),
                )
            )
        rows.append(
            (
                split.name,
                split.samples,
                "output SQNR vs teacher",
                f"{b.sqnr_db:.1f} dB",
                f"{a.sqnr_db:.1f} dB",
            )
        )
    if rows:
        lines += [
            section("Student vs teacher"),
            format_table(rows, ["split", "samples", "metric", "before", "after"], align="lrlrr"),
        ]
    if result.history:
        epochs = [
            (
                r.epoch,
                f"{r.train_loss:.4f}",
                "-" if r.val_loss is None else f"{r.val_loss:.4f}",
                _pct(r.val_agreement),
                f"{r.seconds:.1f}",
            )
            for r in result.history
        ]
        lines += [
            section("Epochs"),
            format_table(
                epochs, ["epoch", "train loss", "held-back loss", "held-back agreement", "s"], align="rrrrr"
            ),
        ]
    return "\n".join(lines)
