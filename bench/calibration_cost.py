#!/usr/bin/env python3
"""Calibration time: onnxshrink's streaming calibration against ONNX Runtime's MinMax calibrator.

Both on the same zoo model and the same 32 samples, in one process, interleaved over rounds:

* ONNX Runtime: ``quant_pre_process`` once (not timed), then ``create_calibrator`` (MinMax, all
  tensors) + ``collect_data`` + ``compute_data`` on the pre-processed model;
* onnxshrink: ``prepare`` once (not timed), then ``collect_stats`` with histograms (what the
  default ``auto`` method needs) on all cores, recording the outputs and skipping the tensors
  whose ranges are derived or never read, as ``shrink`` does.

Reports the median seconds of each and their ratio. Usage:
    python bench/calibration_cost.py [--zoo /work/zoo] [--models resnet18,convnext_tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # onnxruntime.tools imports torch when present

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--models", default="resnet18,mobilenet_v2,densenet121,convnext_tiny")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxshrink.data import open_dataset
    from onnxshrink.modelio import load_model
    from onnxshrink.passes.prepare import prepare
    from onnxshrink.quantize import Int8Config
    from onnxshrink.quantize.calibrate import collect_stats

    print(f"{'model':20s} {'ORT s':>7s} {'onnxshrink s':>13s} {'ratio':>6s}")
    for name in args.models.split(","):
        path = os.path.join(args.zoo, f"{name}.onnx")
        model, _ = load_model(path)
        size = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
        calib = os.path.join(args.zoo, "calib32.npz" if size == 224 else f"calib32_{size}.npz")
        dataset = open_dataset(calib, model)
        samples = list(dataset.take(len(dataset)))
        prepared, _ = prepare(model, samples[:2])
        x = np.load(calib)
        arrays = x[list(x.keys())[0]]
        input_name = model.graph.input[0].name
        with tempfile.TemporaryDirectory() as tmp:
            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(path, pre)

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.i = 0

                def get_next(self) -> dict | None:
                    if self.i >= len(arrays):
                        return None
                    self.i += 1
                    return {input_name: arrays[self.i - 1 : self.i]}

            def ort_once() -> float:
                t = time.perf_counter()
                calibrator = ort_calibrate.create_calibrator(
                    pre, [], augmented_model_path=os.path.join(tmp, "augmented.onnx"), calibrate_method=ort_calibrate.CalibrationMethod.MinMax
                )
                calibrator.collect_data(Reader())
                calibrator.compute_data()
                return time.perf_counter() - t

            def ours_once() -> float:
                t = time.perf_counter()
                collect_stats(
                    prepared, iter(samples), histogram=True, calibrate=range(len(samples)), record=range(len(samples)),
                    quantized_op_types=Int8Config().quantized_op_types, threads=None,
                )  # fmt: skip
                return time.perf_counter() - t

            ort_times, our_times = [], []
            for _ in range(args.rounds):
                ort_times.append(ort_once())
                our_times.append(ours_once())
        o, u = statistics.median(ort_times), statistics.median(our_times)
        print(f"{name:20s} {o:7.2f} {u:13.2f} {u / o:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
