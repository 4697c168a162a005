"""`onnxshrink auto` against the best hand-written recipe, measured in one run.

The hand-written recipes are the ones the README gives for resnet_mini: int8 alone
(`shrink --calib`), 25% channel pruning + int8, and 50% channel pruning recovered by
distillation (the README's `distill` command: 40 epochs on digits_train with mixup) + int8.
Each is built with `onnxshrink run`'s pipeline and scored on the 1000 labelled digits of
digits_eval.npz; the best hand-written one is the fastest that loses at most --max-drop points.
Then `auto` runs with the same data and target. Finally the original, every passing
hand-written model and auto's choice are timed together (interleaved, one process, 1 thread)
and the script prints auto's latency over the best hand-written one's.

    python bench/auto_vs_hand.py --budget 20m --out /tmp/auto_vs_hand
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from onnxshrink.auto import AutoOptions, parse_budget, render_report, run_auto
from onnxshrink.bench.timing import measure_interleaved, paired_ratio
from onnxshrink.recipe import Recipe
from onnxshrink.runtime import make_session
from onnxshrink.shrink import run_recipe

REPO = Path(__file__).resolve().parent.parent
S = REPO / "sample_models"
CALIB, EVAL, TRAIN = str(S / "digits_calib.npz"), str(S / "digits_eval.npz"), str(S / "digits_train.npz")

HAND = {
    "int8": [{"type": "quantize.int8"}],
    "prune0.25+int8": [{"type": "prune.channels", "ratio": 0.25}, {"type": "quantize.int8"}],
    "prune0.5+distill40+int8": [
        {"type": "prune.channels", "ratio": 0.5},
        {"type": "distill", "data": TRAIN, "epochs": 40, "lr": 3e-3, "patience": 8, "mixup": 1.0},
        {"type": "quantize.int8"},
    ],
}


def accuracy(path: Path | str, x: np.ndarray, y: np.ndarray) -> float:
    session = make_session(str(path), threads=1)
    return float(np.mean(session.run(None, {"input": x})[0].argmax(axis=1) == y))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(S / "resnet_mini.onnx"))
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--distill-epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip", action="append", default=[], help="hand-written recipe to leave out (repeatable)")
    ap.add_argument("--out", default="auto_vs_hand")
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = np.load(EVAL)
    x, y = ev["input"], ev["labels"]
    reference = accuracy(args.model, x, y)
    print(f"original: top-1 {100 * reference:.2f}% on {len(y)} digits", flush=True)

    hand: dict[str, dict] = {}
    for name, steps in HAND.items():
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        path = out / f"hand_{name}.onnx"
        recipe = Recipe.from_dict({"version": 1, "data": {"calibration": CALIB}, "steps": steps})
        run_recipe(recipe, args.model, path, measure=False)
        acc = accuracy(path, x, y)
        hand[name] = {"path": path, "accuracy": acc, "drop": 100 * (reference - acc), "seconds": time.perf_counter() - t0}
        print(f"hand {name}: top-1 {100 * acc:.2f}% (drop {hand[name]['drop']:.2f}), built in {hand[name]['seconds']:.0f} s", flush=True)

    t0 = time.perf_counter()
    options = AutoOptions(data=CALIB, eval=EVAL, train=TRAIN, max_drop=args.max_drop, budget_s=parse_budget(args.budget),
                          workers=args.workers, distill_epochs=args.distill_epochs, resume=False)  # fmt: skip
    result = run_auto(args.model, out / "auto.onnx", options, echo=lambda line: print(line, flush=True))
    auto_seconds = time.perf_counter() - t0
    print(render_report(result.report), flush=True)
    auto_acc = accuracy(result.output, x, y)

    passing = {k: v for k, v in hand.items() if v["drop"] <= args.max_drop + 1e-9}
    names = ["original", *passing, "auto"]
    paths = [args.model, *(v["path"] for v in passing.values()), result.output]
    sessions = [make_session(str(p), threads=1) for p in paths]
    feeds = [{"input": x[i : i + 1]} for i in range(8)]
    stats = measure_interleaved(sessions, feeds, warmup=20, rounds=args.rounds, min_seconds=10.0)
    ratios = {n: paired_ratio(s, stats[0]) for n, s in zip(names, stats)}
    print("\nlatency / original (interleaved, 1 thread, batch 1):")
    for n, s in zip(names, stats):
        print(f"  {n:28s} p50 {s.p50:.4f} ms  ratio {ratios[n]:.3f}")
    summary = {
        "reference_accuracy": reference,
        "hand": {k: {"accuracy": v["accuracy"], "drop": v["drop"], "latency_ratio": ratios.get(k)} for k, v in hand.items()},
        "auto": {"accuracy": auto_acc, "drop": 100 * (reference - auto_acc), "latency_ratio": ratios["auto"], "chosen": result.report["chosen"],
                 "candidates": result.report["candidates_total"], "budget_s": options.budget_s, "used_s": round(auto_seconds, 1)},
    }  # fmt: skip
    if passing:
        best = min(passing, key=lambda k: ratios[k])
        summary["best_hand"] = best
        summary["auto_over_best_hand"] = ratios["auto"] / ratios[best]
        print(f"\nbest hand-written recipe meeting the target: {best} (top-1 {100 * hand[best]['accuracy']:.2f}%, latency ratio {ratios[best]:.3f})")
        print(f"auto: {result.report['chosen']} (top-1 {100 * auto_acc:.2f}%, latency ratio {ratios['auto']:.3f}); "
              f"{result.report['candidates_total']} candidates in {auto_seconds:.0f} s of a {options.budget_s:.0f} s budget")  # fmt: skip
        print(f"auto latency / best hand-written latency: {summary['auto_over_best_hand']:.3f}")
    (out / "auto_vs_hand.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
