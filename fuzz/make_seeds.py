#!/usr/bin/env python3
"""Write a seed corpus for ``fuzz_load_shrink.py``: small valid models, one file each.

Sources: the exporter fixtures in ``tests/data/exporters`` (external data inlined), the sample
models, the ``simple`` / ``pytorch-*`` models and a spread of node-test models that the
installed ``onnx`` wheel carries (opset < 11 ones are upgraded to 13 so they get past the
loader and exercise the passes). Files over ``--max-bytes`` are skipped.

Usage: python fuzz/make_seeds.py OUT_DIR [--max-bytes 65536] [--node-tests 200]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
from pathlib import Path

import onnx
from onnx import version_converter

REPO = Path(__file__).resolve().parent.parent
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _candidates(node_tests: int) -> list[Path]:
    paths = sorted(REPO.glob("tests/data/exporters/**/*.onnx")) + sorted(REPO.glob("sample_models/*.onnx"))
    for folder in ("simple", "pytorch-converted", "pytorch-operator"):
        paths += sorted(Path(p) for p in glob.glob(f"{ONNX_DATA}/{folder}/*/model.onnx"))
    nodes = sorted(Path(p) for p in glob.glob(f"{ONNX_DATA}/node/*/model.onnx"))
    if node_tests and nodes:
        step = max(1, len(nodes) // node_tests)
        paths += nodes[::step][:node_tests]
    return paths


def _seed_bytes(path: Path) -> bytes | None:
    try:
        model = onnx.load(str(path), load_external_data=True)  # our own files and onnx's: trusted
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and opset < 11:
            model = version_converter.convert_version(model, 13)
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - a model we cannot turn into a seed is just skipped
        return None


def write_seeds(out: Path, *, max_bytes: int = 65536, node_tests: int = 200) -> int:
    """Write the seeds into ``out`` (named by content hash); return how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in _candidates(node_tests):
        blob = _seed_bytes(path)
        if blob is None or len(blob) > max_bytes:
            continue
        (out / hashlib.sha1(blob).hexdigest()).write_bytes(blob)
        written += 1
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-bytes", type=int, default=65536)
    parser.add_argument("--node-tests", type=int, default=200)
    args = parser.parse_args()
    count = write_seeds(args.out, max_bytes=args.max_bytes, node_tests=args.node_tests)
    print(f"{count} seeds in {os.fspath(args.out)}")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
