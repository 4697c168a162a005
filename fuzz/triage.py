#!/usr/bin/env python3
"""Group crash inputs by signature (exception type + innermost onnxshrink function).

Usage: python fuzz/triage.py CRASH_FILE... [--save DIR]
Prints one line per signature with its count and an example; ``--save`` copies the smallest
input of each signature to DIR/<type>-<module>-<function>.onnx (the reproducers in
fuzz/crashes/ were saved this way). Replay one with
``ONNXSHRINK_FUZZ_STRICT=1 python fuzz/fuzz_load_shrink.py --repro FILE``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_load_shrink as target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    target._quiet()
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in args.files:
        try:
            target.run_one(path.read_bytes())
            groups["no crash now"].append(path)
        except Exception as exc:  # noqa: BLE001 - that is what we are sorting
            groups[target.signature(exc)].append(path)
    for sig, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        smallest = min(paths, key=lambda p: p.stat().st_size)
        print(f"{len(paths):4d}  {sig}  (e.g. {smallest})")
        if args.save and sig != "no crash now":
            args.save.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", sig.replace(" in onnxshrink/", "-")).strip("-")
            shutil.copyfile(smallest, args.save / f"{name}.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
