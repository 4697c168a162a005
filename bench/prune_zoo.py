#!/usr/bin/env python3
"""Channel-prune the benchmark zoo and measure what it buys in ONNX Runtime.

For each torchvision model exported by ``bench/export_zoo.py`` (``<zoo>/<name>.onnx``):

1. load it safely (``onnxshrink.modelio.load_model``) and prune channels at ``--ratio``
   (default 0.5 of every prunable group, L1 importance);
2. check the result with ``onnx.checker.check_model(full_check=True)`` and run it;
3. time dense and pruned fp32 in one process, 1 intra-op thread, batch 1: after warm-up,
   every round runs both once (alternating which goes first) and the ratio is the median
   pruned time over the median dense time (``--rounds``, at least 30).

It prints one table (groups pruned/skipped with the top skip reasons, MACs, parameters,
latency) and can write every figure as JSON (``--json``). ``--int8-hook onnxshrink`` (or
``MODULE:FUNC``, called as ``FUNC(model, calibration_feeds) -> ModelProto``) also quantizes
the pruned model and adds the "pruned int8 / dense fp32" latency column (the issue's target
for that is <= 0.18).

Only onnx, onnxruntime, numpy and onnxshrink are used (no torch).

With ``--digits sample_models`` it instead scores the three trained sample models on
``digits_eval.npz`` after magnitude (50 %) and channel pruning (25 / 50 %), without
fine-tuning and after BatchNorm recalibration on ``digits_calib.npz``.

Usage::

    python bench/prune_zoo.py [--zoo /work/zoo] [--models resnet18,resnet50] [--ratio 0.5]
                              [--rounds 30] [--json out.json] [--save DIR] [--int8-hook onnxshrink]
    python bench/prune_zoo.py --digits sample_models
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxshrink.modelio import load_model, save_model
from onnxshrink.prune import ChannelPruneConfig, prune_channels
from onnxshrink.prune.config import Importance
from onnxshrink.report import format_table, human_count
from onnxshrink.runtime import make_session, run

MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "squeezenet1_1",
    "shufflenet_v2_x1_0", "regnet_y_400mf", "densenet121", "inception_v3", "convnext_tiny", "vgg16",
]  # fmt: skip
#: The issue's done-when targets for fp32 latency (pruned / dense) at ratio 0.5.
TARGETS = {"resnet18": 0.55, "resnet50": 0.55}

Hook = Callable[[onnx.ModelProto, list[dict[str, np.ndarray]]], onnx.ModelProto]


def sample_input(zoo: Path, name: str) -> np.ndarray:
    """The first row of the zoo's held-back eval set (batch 1), or zeros if it is missing."""
    size = 299 if name == "inception_v3" else 224
    path = zoo / ("eval32_299.npz" if size == 299 else "eval32.npz")
    if path.exists():
        with np.load(path) as data:
            return np.ascontiguousarray(data["input"][:1])
    return np.zeros((1, 3, size, size), np.float32)


def calibration_feeds(zoo: Path, name: str, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` single-image feeds from the zoo's calibration set (calib32[_299].npz)."""
    path = zoo / ("calib32_299.npz" if name == "inception_v3" else "calib32.npz")
    with np.load(path) as data:
        x = data["input"][:count]
    return [{"input": np.ascontiguousarray(x[i : i + 1])} for i in range(len(x))]


def time_interleaved(
    sessions: dict[str, Any], feeds: dict[str, np.ndarray], *, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per run of each session, measured in alternating order, round by round."""
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            run(sessions[name], feeds)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            run(sessions[name], feeds)
            times[name].append(time.perf_counter() - start)
    return times


def onnxshrink_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """The default int8 hook: onnxshrink's static QDQ quantizer, accuracy fallback off.

    The zoo models have random weights, so there is no accuracy to keep; the fallback is
    disabled (``max_drop=100``) so that the figure measures int8 speed alone.
    """
    from onnxshrink.data import Dataset, Sample
    from onnxshrink.quantize import Int8Config, quantize_int8

    class Feeds(Dataset):
        source = "prune_zoo calibration"

        def __len__(self) -> int:
            return len(calibration)

        def __iter__(self):  # type: ignore[no-untyped-def]
            return (Sample(f) for f in calibration)

    return quantize_int8(model, Feeds(), Int8Config(max_drop=100.0)).model


def load_hook(spec: str | None) -> Hook | None:
    """``MODULE:FUNC``, or ``onnxshrink`` for :func:`onnxshrink_int8`."""
    if not spec:
        return None
    if spec == "onnxshrink":
        return onnxshrink_int8
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def bench_one(zoo: Path, name: str, args: argparse.Namespace, hook: Hook | None) -> dict[str, Any]:
    path = zoo / f"{name}.onnx"
    row: dict[str, Any] = {"model": name}
    if not path.exists():
        row["error"] = "missing"
        return row
    started = time.perf_counter()
    dense, _ = load_model(path)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense)
    report = prune_channels(pruned, ChannelPruneConfig(ratio=args.ratio, round_to=args.round_to))
    row["prune_seconds"] = time.perf_counter() - started
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"input": sample_input(zoo, name)}
    sessions = {"dense": make_session(dense, threads=1), "pruned": make_session(pruned, threads=1)}
    if hook is not None:
        try:
            sessions["pruned_int8"] = make_session(
                hook(pruned, calibration_feeds(zoo, name, args.calib)), threads=1
            )
        except Exception as exc:  # noqa: BLE001 - the fp32 figures stand on their own
            row["int8_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    out_dense, out_pruned = run(sessions["dense"], feeds)[0], run(sessions["pruned"], feeds)[0]
    if out_dense.shape != out_pruned.shape or not np.all(np.isfinite(out_pruned)):
        raise AssertionError(
            f"{name}: pruned output {out_pruned.shape} is not a valid {out_dense.shape} output"
        )
    times = time_interleaved(sessions, feeds, rounds=args.rounds, warmup=args.warmup)
    medians = {k: statistics.median(v) for k, v in times.items()}
    row.update(
        {
            "groups_pruned": report.count("pruned"),
            "groups_skipped": report.count("skipped"),
            "groups_unchanged": report.count("unchanged"),
            "skip_reasons": dict(report.skip_tally.most_common()),
            "macs": [report.macs_before, report.macs_after],
            "params": [report.params_before, report.params_after],
            "bytes": [report.bytes_before, report.bytes_after],
            "latency_ms": {k: 1000 * v for k, v in medians.items()},
            "latency_ratio": medians["pruned"] / medians["dense"],
            "per_round_ratio_median": statistics.median(
                p / d for p, d in zip(times["pruned"], times["dense"])
            ),
            "rounds": args.rounds,
            "checker": "ok",
        }
    )
    if "pruned_int8" in medians:
        row["int8_ratio"] = medians["pruned_int8"] / medians["dense"]
    if args.save:
        save_model(pruned, Path(args.save) / f"{name}.pruned.onnx")
    return row


DIGIT_MODELS = ("plain_cnn", "resnet_mini", "mobilenet_mini")
DIGIT_CHANNEL_RUNS: tuple[tuple[float, Importance], ...] = (
    (0.25, "l1"),
    (0.5, "l1"),
    (0.25, "bn_gamma"),
    (0.5, "bn_gamma"),
)


def bench_digits(folder: Path) -> str:
    """Accuracy of the trained sample models (``--digits``) after magnitude and channel pruning.

    Top-1 on ``digits_eval.npz`` (1000 digits), dense vs pruned, without fine-tuning, and
    again after :func:`~onnxshrink.prune.recalibrate_batchnorm` on ``digits_calib.npz``.
    """
    from onnxshrink.prune import MagnitudePruneConfig, prune_magnitude, recalibrate_batchnorm

    with np.load(folder / "digits_eval.npz") as data:
        x, labels = data["input"], data["labels"]
    with np.load(folder / "digits_calib.npz") as data:
        calib = [{"input": data["input"][i : i + 100]} for i in range(0, len(data["input"]), 100)]

    def top1(model: onnx.ModelProto) -> float:
        return float(np.mean(run(make_session(model, threads=1), {"input": x})[0].argmax(axis=1) == labels))

    def scored(
        name: str, base: float, method: str, model: onnx.ModelProto, size: str, params: str
    ) -> tuple[str, ...]:
        """A table row: top-1 of ``model`` as pruned, then after BatchNorm recalibration."""
        acc = top1(model)
        after = "no BN"
        if recalibrate_batchnorm(model, calib):
            recal = top1(model)
            after = f"{100 * recal:.1f} ({100 * (recal - base):+.1f})"
        return (name, method, size, params, f"{100 * acc:.1f}", f"{100 * (acc - base):+.1f}", after)

    rows: list[tuple[str, ...]] = []
    for name in DIGIT_MODELS:
        dense, _ = load_model(folder / f"{name}.onnx")
        base = top1(dense)
        rows.append((name, "dense", "-", "-", f"{100 * base:.1f}", "", ""))
        for scope in ("layer", "global"):
            model = onnx.ModelProto()
            model.CopyFrom(dense)
            mag = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, scope=scope))
            size = f"sparsity {100 * mag.sparsity:.1f}%, gzip {mag.gzip_before} -> {mag.gzip_after} B"
            rows.append(scored(name, base, f"magnitude 0.5 {scope}", model, size, "-"))
        for ratio, importance in DIGIT_CHANNEL_RUNS:
            model = onnx.ModelProto()
            model.CopyFrom(dense)
            rep = prune_channels(model, ChannelPruneConfig(ratio=ratio, importance=importance))
            onnx.checker.check_model(model, full_check=True)
            macs = f"MACs {human_count(rep.macs_before)} -> {human_count(rep.macs_after)}"
            params = f"{human_count(rep.params_before)} -> {human_count(rep.params_after)}"
            rows.append(scored(name, base, f"channels {ratio} {importance}", model, macs, params))
    headers = ["model", "pruning", "sparsity / MACs", "params", "top-1 %", "change pt", "after BN recal (pt)"]
    return format_table(rows, headers, align="lllllll")


def render(rows: list[dict[str, Any]], with_int8: bool) -> str:
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["model"], r["error"], "", "", "", "", "", ""))
            continue
        reasons = ", ".join(f"{k} x{n}" for k, n in list(r["skip_reasons"].items())[:3]) or "-"
        lat = r["latency_ms"]
        cells = [
            r["model"],
            f"{r['groups_pruned']}/{r['groups_skipped']}",
            reasons,
            f"{human_count(r['macs'][0])} -> {human_count(r['macs'][1])}",
            f"{human_count(r['params'][0])} -> {human_count(r['params'][1])}",
            f"{lat['dense']:.1f} / {lat['pruned']:.1f}",
            f"{r['latency_ratio']:.3f}"
            + (f" (target <= {TARGETS[r['model']]:.2f})" if r["model"] in TARGETS else ""),
        ]
        if with_int8:
            cells.append(
                f"{r['int8_ratio']:.3f}" if "int8_ratio" in r else ("failed" if "int8_error" in r else "-")
            )
        else:
            cells.append("-")
        table.append(tuple(cells))
    headers = [
        "model",
        "pruned/skipped",
        "top skip reasons",
        "MACs",
        "params",
        "ms dense / pruned",
        "latency ratio",
        "int8+prune ratio",
    ]
    return format_table(table, headers, align="llllllll")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="/work/zoo", help="folder of <name>.onnx files (default /work/zoo)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of prunable channels to remove (default 0.5)"
    )
    ap.add_argument("--round-to", type=int, default=1, help="keep channel counts at a multiple of this")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per model (at least 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write every figure to this JSON file")
    ap.add_argument("--save", help="also save the pruned models into this folder")
    ap.add_argument(
        "--int8-hook",
        help="quantize the pruned model too and add the int8 column: 'onnxshrink' (onnxshrink.quantize) "
        "or MODULE:FUNC called as FUNC(model, calibration_feeds) -> ModelProto",
    )
    ap.add_argument("--calib", type=int, default=32, help="calibration images for the int8 hook (default 32)")
    ap.add_argument(
        "--digits", help="instead: score the trained sample models in this folder (sample_models)"
    )
    args = ap.parse_args(argv)
    if args.digits:
        print(bench_digits(Path(args.digits)))
        return 0
    if args.rounds < 30:
        ap.error("--rounds must be at least 30")
    zoo = Path(args.zoo)
    if not (zoo / "ort_baseline.json").exists():
        print(
            f"note: {zoo}/ort_baseline.json not found: the zoo export may still be running", file=sys.stderr
        )
    hook = load_hook(args.int8_hook)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = []
    for name in names:
        try:
            row = bench_one(zoo, name, args, hook)
        except Exception as exc:  # noqa: BLE001 - one failing model must not hide the others
            row = {
                "model": name,
                "error": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"Channel pruning at ratio {args.ratio} (onnxruntime fp32, 1 thread, batch 1, median of {args.rounds} interleaved rounds)"
    )
    print(render(rows, hook is not None))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"ratio": args.ratio, "rounds": args.rounds, "cpu_count": os.cpu_count(), "rows": rows},
                indent=2,
            )
        )
    failed = [r["model"] for r in rows if "error" in r]
    missed = [
        r["model"] for r in rows if r["model"] in TARGETS and r.get("latency_ratio", 9) > TARGETS[r["model"]]
    ]
    if failed or missed:
        print(f"failed: {failed or '-'}; latency target missed: {missed or '-'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
