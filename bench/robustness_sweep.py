#!/usr/bin/env python3
"""Run every command on the test models that the ``onnx`` wheel carries and count exit codes.

A first pass at issue 8's correctness corpus: models nobody here wrote, each given to
``inspect``, ``shrink`` (int8, random calibration) and ``shrink`` (channel pruning only).
Anything other than exit 0-3, a traceback, or a hang is a bug and is listed.

Usage: python bench/robustness_sweep.py [--timeout 60]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import subprocess
import sys
import tempfile

import onnx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    models = sorted(
        p for folder in ("simple", "pytorch-converted", "pytorch-operator") for p in glob.glob(f"{root}/{folder}/*/model.onnx")
    )
    codes: collections.Counter[tuple[str, object]] = collections.Counter()
    bugs = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            runs = {
                "inspect": ["inspect", model],
                "shrink-int8": ["shrink", model, "-o", f"{tmp}/q.onnx", "--calib", "random", "--no-timing"],
                "shrink-prune": ["shrink", model, "-o", f"{tmp}/p.onnx", "--quantize", "none", "--prune-channels", "0.5", "--no-timing"],
            }
            for name, argv in runs.items():
                try:
                    proc = subprocess.run([sys.executable, "-m", "onnxshrink", *argv], capture_output=True, text=True, timeout=args.timeout)
                    code: object = proc.returncode
                    last = (proc.stderr.strip().splitlines() or [""])[-1]
                    traceback = "Traceback" in proc.stderr
                except subprocess.TimeoutExpired:
                    code, last, traceback = "timeout", "", False
                codes[(name, code)] += 1
                if code not in (0, 1, 2, 3) or traceback:
                    bugs.append((os.path.basename(os.path.dirname(model)), name, code, last[:200]))
    print(f"{len(models)} models")
    for (name, code), count in sorted(codes.items(), key=str):
        print(f"  {name:13s} exit {code}: {count}")
    print(f"bugs (internal errors, tracebacks, hangs): {len(bugs)}")
    for bug in bugs:
        print("  ", *bug)
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
