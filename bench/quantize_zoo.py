#!/usr/bin/env python3
"""onnxshrink's int8 against ONNX Runtime's quantize_static on the torchvision zoo.

For each zoo model (fp32 ONNX from bench/export_zoo.py, calibration sets calib32/calib512):

* onnxshrink: ``onnxshrink shrink MODEL -o OUT --calib calib32.npz --no-timing --json`` in a
  child process (its JSON gives conversion wall time and peak RSS, imports excluded/included
  as for the baseline); optionally again with calib512 to check that peak RSS stays flat;
* ONNX Runtime: ``quant_pre_process`` then ``quantize_static`` (defaults; and QDQ with uint8
  activations, per-channel), each step in a child process (bench/ort_baseline.py's worker),
  at onnxruntime's default thread count, like onnxshrink;
* the conversions compared (onnxshrink, pre-processing, ort_default) run interleaved,
  ``--convert-repeats`` times each; their time and peak RSS are the medians;
* latency of fp32, onnxshrink, ort_default and ort_u8s8_pc in one process: 1 thread, batch 1,
  ORT_ENABLE_ALL, interleaved rounds; reported as the median over rounds of int8/fp32;
* agreement with fp32 on 32 held-back inputs (eval32): top-1 agreement and SQNR.

Usage:
    python bench/quantize_zoo.py [--zoo /work/zoo] [--models a,b] [--rounds 30] [--rss-check a,b]
                                 [--convert-repeats 3] [--json out.json]
Needs only onnx, onnxruntime, numpy and onnxshrink (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ort_baseline as ob  # noqa: E402


def run_onnxshrink(src: str, dst: str, calib: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "onnxshrink", "shrink", src, "-o", dst, "--calib", calib, "--no-timing", "--json"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        return {"ok": False, "error": proc.stderr.strip()[-500:]}
    doc = json.loads(proc.stdout)
    return {
        "ok": True,
        "seconds": doc["conversion"]["wall_seconds"],
        "peak_rss_mb": doc["conversion"]["peak_rss_mb"],
        "process_wall_s": round(wall, 3),
        "size_mb": round(doc["size"]["after_bytes"] / 1e6, 2),
        "int8_mac_fraction": doc["int8"]["fusion"]["int8_mac_fraction"],
        "fp32_nodes": len(doc["int8"]["fp32_nodes"]),
        "unfused": doc["int8"]["fusion"]["unfused_by_op_type"],
    }


def median_run(results: list[dict]) -> dict:
    """One conversion's result over repeats: the median seconds and peak RSS, every value kept."""
    ok = [r for r in results if r.get("ok")]
    if len(ok) < len(results) or not ok:
        return next(r for r in results if not r.get("ok"))
    merged = dict(ok[-1])
    for key in ("seconds", "peak_rss_mb", "process_wall_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            merged[key] = float(np.median(values))
            merged[key + "_all"] = values
    return merged


def bench_model(name: str, args: argparse.Namespace) -> dict:
    fp32 = os.path.join(args.zoo, f"{name}.onnx")
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    iname, dims = ob.model_input(fp32)
    size = int(dims[-1])
    suffix = "" if size == 224 else f"_{size}"
    calib32 = os.path.join(args.zoo, f"calib32{suffix}.npz")
    rec: dict = {"model": name, "variants": {}}

    ours = os.path.join(work, f"{name}.onnxshrink.onnx")
    pre = os.path.join(work, f"{name}.pre.onnx")
    ort_default = os.path.join(work, f"{name}.ort_default.onnx")
    # The conversions to compare, interleaved round by round (the machine's load drifts).
    runs: dict[str, list[dict]] = {"onnxshrink": [], "pre": [], "ort_default": []}
    for i in range(args.convert_repeats):
        print(f"[{name}] conversions, round {i + 1}/{args.convert_repeats}: onnxshrink, ort pre-process, ort_default ...", flush=True)
        runs["onnxshrink"].append(run_onnxshrink(fp32, ours, calib32, args.timeout))
        runs["pre"].append(ob.run_step({"op": "pre", "src": fp32, "dst": pre, "threads": 0, "zoo": args.zoo}, args.timeout, None))
        spec = {"op": "quant", "variant": "ort_default", "src": pre, "dst": ort_default, "threads": 0, "zoo": args.zoo}
        runs["ort_default"].append(ob.run_step(spec, args.timeout, None))
    rec["variants"]["onnxshrink"] = {"convert": median_run(runs["onnxshrink"])}
    rec["ort_preprocess"] = median_run(runs["pre"])
    rec["variants"]["ort_default"] = {"convert": median_run(runs["ort_default"])}
    if name in args.rss_check:
        calib512 = os.path.join(args.zoo, f"calib512{suffix}.npz")
        rec["variants"]["onnxshrink"]["convert_512"] = run_onnxshrink(fp32, os.path.join(work, "c512.onnx"), calib512, args.timeout)

    paths = {"onnxshrink": ours} if rec["variants"]["onnxshrink"]["convert"].get("ok") else {}
    if rec["variants"]["ort_default"]["convert"].get("ok"):
        paths["ort_default"] = ort_default
    dst = os.path.join(work, f"{name}.ort_u8s8_pc.onnx")
    print(f"[{name}] ort_u8s8_pc ...", flush=True)
    res = ob.run_step({"op": "quant", "variant": "ort_u8s8_pc", "src": pre, "dst": dst, "threads": 0, "zoo": args.zoo}, args.timeout, None)
    rec["variants"]["ort_u8s8_pc"] = {"convert": res}
    if res.get("ok"):
        paths["ort_u8s8_pc"] = dst

    sessions = {"fp32": (ob.make_session(fp32), iname)}
    for variant, path in paths.items():
        sessions[variant] = (ob.make_session(path), ob.model_input(path)[0])
    xs = ob.load_set(args.zoo, "eval32", size)
    lat = ob.latency(sessions, xs[:1], args.warmup, args.rounds)
    rec["fp32_latency_ms"] = lat["fp32"]["median_ms"]
    ref = ob.run_all(sessions["fp32"][0], iname, xs)
    for variant in paths:
        rec["variants"][variant]["latency"] = lat[variant]
        rec["variants"][variant]["agreement"] = ob.agreement(ref, ob.run_all(sessions[variant][0], sessions[variant][1], xs))
    if not args.keep:
        for p in [pre, *paths.values()]:
            if os.path.exists(p):
                os.remove(p)
    return rec


def print_table(results: list[dict]) -> None:
    head = (
        f"{'model':20s} {'fp32 ms':>8s} | {'int8/fp32: ours':>15s} {'ort_def':>8s} {'ort_u8':>7s} {'ours/best':>9s} | "
        f"{'convert s: ours':>15s} {'ort+pre':>8s} | {'peak MB: ours':>13s} {'ort':>6s} {'ours@512':>8s} | {'agree':>5s} {'SQNR':>5s}"
    )
    print(head)
    print("-" * len(head))
    ratios = []
    for r in results:
        v = r["variants"]

        def ratio(k: str) -> float | None:
            return v.get(k, {}).get("latency", {}).get("ratio_median_of_rounds")

        ours, dflt, u8 = ratio("onnxshrink"), ratio("ort_default"), ratio("ort_u8s8_pc")
        best = min(x for x in (dflt, u8) if x is not None) if (dflt or u8) else None
        conv = v["onnxshrink"]["convert"]
        pre = r.get("ort_preprocess", {})
        ort_conv = v.get("ort_default", {}).get("convert", {})
        ort_time = (pre.get("seconds") or 0) + (ort_conv.get("seconds") or 0)
        ort_rss = max(pre.get("peak_rss_mb") or 0, ort_conv.get("peak_rss_mb") or 0)
        c512 = v["onnxshrink"].get("convert_512", {}).get("peak_rss_mb")
        agree = v["onnxshrink"].get("agreement", {})
        if ours is not None:
            ratios.append(ours)

        def f(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        print(
            f"{r['model']:20s} {f(r.get('fp32_latency_ms'), '8.2f')} | {f(ours, '15.3f')} {f(dflt, '8.3f')} {f(u8, '7.3f')} "
            f"{f(ours / best if ours and best else None, '9.3f')} | {f(conv.get('seconds'), '15.1f')} {ort_time:8.1f} | "
            f"{f(conv.get('peak_rss_mb'), '13.0f')} {ort_rss:6.0f} {f(c512, '8.0f')} | "
            f"{f(agree.get('top1_agreement'), '5.2f')} {f(agree.get('sqnr_db'), '5.1f')}"
        )
    if ratios:
        print(f"\nmedian int8/fp32 latency ratio (onnxshrink): {float(np.median(ratios)):.3f} over {len(ratios)} models")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="/work/zoo")
    parser.add_argument("--work", default="/tmp/onnxshrink-quantize-zoo")
    parser.add_argument("--models", default=",".join(ob.MODELS))
    parser.add_argument("--rss-check", default="resnet50,mobilenet_v2", help="models also converted with calib512")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--convert-repeats", type=lambda v: max(1, int(v)), default=1, help="conversions per tool (interleaved); time and RSS are medians")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.rss_check = set(filter(None, args.rss_check.split(",")))
    results = []
    for name in filter(None, args.models.split(",")):
        try:
            results.append(bench_model(name, args))
        except Exception as exc:  # noqa: BLE001 - one model failing must not stop the run
            results.append({"model": name, "variants": {"onnxshrink": {"convert": {"ok": False, "error": repr(exc)}}}})
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "results": results}, fh, indent=1)
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
