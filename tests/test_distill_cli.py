"""``onnxshrink distill`` through click's runner (the command object itself) and main()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from conftest import write_model
from test_distill_hook import perturbed

from onnxshrink.cli.distill_cmd import distill
from onnxshrink.errors import DataError, ModelSaveError
from onnxshrink.modelio import load_model
from onnxshrink.testing import conv_net


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    teacher = conv_net(channels=(3, 8), size=12, seed=1)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((40, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "train.npz", input=inputs)
    np.savez(tmp_path / "eval.npz", input=inputs[:12], labels=rng.integers(0, 10, 12))
    return {
        "teacher": write_model(teacher, tmp_path / "teacher.onnx"),
        "student": write_model(perturbed(teacher, 0.5), tmp_path / "student.onnx"),
        "train": tmp_path / "train.npz",
        "eval": tmp_path / "eval.npz",
        "out": tmp_path / "tuned.onnx",
    }


def args(files: dict[str, Path], *extra: str, out: Path | None = None) -> list[str]:
    return [
        "--teacher",
        str(files["teacher"]),
        "--student",
        str(files["student"]),
        "--data",
        str(files["train"]),
        "-o",
        str(out or files["out"]),
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        *extra,
    ]


def test_json_report(files) -> None:
    result = CliRunner().invoke(
        distill, args(files, "--eval", str(files["eval"]), "--json", "--val-fraction", "0.25")
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "onnxshrink.distill/1" and doc["output"] == str(files["out"])
    assert doc["train_samples"] == 30 and doc["val_samples"] == 10 and doc["epochs_run"] == 2
    splits = {s["name"]: s for s in doc["splits"]}
    assert set(splits) == {"held-back", "eval"}
    assert splits["eval"]["before"]["accuracy_candidate"] is not None  # the eval set has labels
    assert splits["held-back"]["after"]["top1_agreement"] >= splits["held-back"]["before"]["top1_agreement"]
    assert len(doc["history"]) == 2 and doc["seconds"] > 0
    load_model(files["out"])


def test_table_report(files) -> None:
    result = CliRunner().invoke(distill, args(files, "--eval", str(files["eval"])))
    assert result.exit_code == 0, result.output
    for text in (
        "top-1 agreement with teacher",
        "accuracy (teacher",
        "held-back",
        "eval",
        "Epochs",
        "best epoch",
    ):
        assert text in result.output


def test_refuses_to_overwrite_the_student(files) -> None:
    before = files["student"].read_bytes()
    result = CliRunner().invoke(distill, args(files, out=files["student"]))
    assert isinstance(result.exception, ModelSaveError) and "overwrite" in str(result.exception)
    assert files["student"].read_bytes() == before


def test_labels_flag_needs_labelled_data(files) -> None:
    result = CliRunner().invoke(distill, args(files, "--labels"))
    assert isinstance(result.exception, DataError) and "label" in str(result.exception)


@pytest.mark.parametrize(
    "flag", [["--alpha", "1.5"], ["--temperature", "0"], ["--val-fraction", "1"], ["--epochs", "0"]]
)
def test_bad_flags_are_usage_errors(files, flag) -> None:
    assert CliRunner().invoke(distill, args(files, *flag)).exit_code == 2


def test_main_prints_one_line_errors(files, capsys) -> None:
    from onnxshrink.cli import main

    missing = str(files["train"]) + ".missing"
    argv = [
        "distill",
        "--teacher",
        str(files["teacher"]),
        "--student",
        str(files["student"]),
        "--data",
        missing,
    ]
    code = main([*argv, "-o", str(files["out"])])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("onnxshrink: error: ") and "data not found" in err and err.count("\n") == 1
