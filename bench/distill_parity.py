#!/usr/bin/env python3
"""Distillation measurements that need files outside CI (the zoo) or take minutes.

``parity`` (default): TorchGraph vs onnxruntime on the benchmark zoo. For every model in the
zoo folder (skipping those not there yet) the same inputs go through onnxruntime (CPU
provider, all graph optimisations, as deployed) and through ``onnxshrink.distill.TorchGraph``
(no gradients); the report gives the largest absolute output difference, that difference
relative to the largest reference magnitude, and top-1 agreement.

``students``: write the damaged students of the recovery measurement: the sample models
channel-pruned at ratio 0.5 with ``onnxshrink.prune.prune_channels`` (or, with
``--magnitude``, 50% magnitude pruning of every Conv weight), plus their eval accuracy.
``onnxshrink distill`` then fine-tunes them (see the commands in the docstring of
``onnxshrink.distill``'s report, or the issue's report).

Usage::

    python bench/distill_parity.py [parity] [--zoo /work/zoo] [--samples 4] [--models a,b] [--json]
    python bench/distill_parity.py students --out /tmp/students [--magnitude]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"
MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "squeezenet1_1",
    "shufflenet_v2_x1_0", "regnet_y_400mf", "densenet121", "inception_v3", "convnext_tiny", "vgg16",
]  # fmt: skip


def measure(path: Path, inputs: np.ndarray, threads: int) -> dict[str, object]:
    """TorchGraph vs onnxruntime on one model."""
    import torch

    from onnxshrink.distill import TorchGraph
    from onnxshrink.modelio import load_model
    from onnxshrink.runtime import make_session, run

    model, _ = load_model(path)
    name = model.graph.input[0].name
    session = make_session(model, threads=threads)
    start = time.perf_counter()
    reference = run(session, {name: inputs})[0]
    ort_s = time.perf_counter() - start
    graph = TorchGraph(model)
    start = time.perf_counter()
    candidate = graph.predict({name: inputs})[0]
    torch_s = time.perf_counter() - start
    del graph, session, model
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate)))
    scale = float(np.max(np.abs(reference)))
    return {
        "model": path.stem,
        "samples": int(inputs.shape[0]),
        "max_abs_error": diff,
        "relative_error": diff / scale if scale else diff,
        "output_scale": scale,
        "top1_agreement": float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))),
        "ort_seconds": round(ort_s, 3),
        "torch_seconds": round(torch_s, 3),
        "torch_threads": torch.get_num_threads(),
    }


def parity(args: argparse.Namespace) -> int:
    import torch

    from onnxshrink.report import format_table

    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models.split(","):
        path = args.zoo / f"{model}.onnx"
        if not path.is_file():
            print(f"skip {model}: {path} not found", file=sys.stderr)
            continue
        data = args.zoo / ("eval32_299.npz" if model == "inception_v3" else "eval32.npz")
        with np.load(data) as npz:
            inputs = np.ascontiguousarray(npz["input"][: args.samples])
        rows.append(measure(path, inputs, args.threads))
        print(f"done {model}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        (r["model"], r["samples"], f"{r['max_abs_error']:.2e}", f"{r['relative_error']:.2e}",
         f"{r['output_scale']:.3g}", f"{100 * r['top1_agreement']:.0f}%", r["ort_seconds"], r["torch_seconds"])
        for r in rows
    ]  # fmt: skip
    headers = ["model", "n", "max |ort-torch|", "relative", "max |ort|", "top-1 agree", "ort s", "torch s"]
    print(format_table(table, headers, align="lrrrrrrr"))
    return 0


def _magnitude_prune_convs(model: object, sparsity: float) -> None:
    from onnx import numpy_helper

    convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}  # type: ignore[attr-defined]
    for t in model.graph.initializer:  # type: ignore[attr-defined]
        if t.name in convs:
            w = numpy_helper.to_array(t).copy()
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))


def students(args: argparse.Namespace) -> int:
    from onnxshrink.modelio import load_model, save_model
    from onnxshrink.testing import run_ort

    args.out.mkdir(parents=True, exist_ok=True)
    with np.load(SAMPLES / "digits_eval.npz") as npz:
        x, labels = npz["input"], npz["labels"]
    for name in ("resnet_mini", "mobilenet_mini"):
        model, _ = load_model(SAMPLES / f"{name}.onnx")
        fp32 = float(np.mean(run_ort(model, {"input": x})[0].argmax(1) == labels))
        if args.magnitude:
            _magnitude_prune_convs(model, 0.5)
            how = "magnitude 50% of Conv weights"
        else:
            from onnxshrink.prune import ChannelPruneConfig, prune_channels

            prune_channels(model, ChannelPruneConfig(ratio=0.5))
            how = "channels, ratio 0.5"
        path = save_model(model, args.out / f"{name}.pruned.onnx")
        damaged = float(np.mean(run_ort(model, {"input": x})[0].argmax(1) == labels))
        print(f"{name}: pruned ({how}) -> {path}; digits_eval top-1 fp32 {fp32:.3f}, pruned {damaged:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["parity", "students"], default="parity")
    parser.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    parser.add_argument("--samples", type=int, default=4, help="parity: inputs per model (rows of eval32*.npz)")
    parser.add_argument("--models", default=",".join(MODELS), help="parity: comma-separated zoo model names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="parity: JSON rows instead of a table")
    parser.add_argument("--out", type=Path, default=Path("students"), help="students: output folder")
    parser.add_argument("--magnitude", action="store_true", help="students: magnitude instead of channel pruning")
    args = parser.parse_args(argv)
    return parity(args) if args.mode == "parity" else students(args)


if __name__ == "__main__":
    sys.exit(main())
