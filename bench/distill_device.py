#!/usr/bin/env python3
"""The distillation training hook on a torch device (e.g. CUDA) against the same steps on CPU.

A user's own training loop drives :class:`onnxshrink.distill.DistillationHook` on whatever
device it trains on: ``hook.student.to(device)``, then the usual optimizer steps, then
``hook.export(path)``. This script checks that this works on each device given and gives the
same result: for each device it

1. makes the student: the teacher channel-pruned at ``--ratio`` (``onnxshrink.prune``), so
   there is accuracy to recover;
2. runs ``--steps`` Adam steps of the hook on ``--batch``-sample batches of the unlabelled
   training set (the teacher runs in onnxruntime on the CPU; the student on the device),
   timing each step (CUDA synchronised);
3. exports the trained student and evaluates it in onnxruntime (CPU provider): top-1
   accuracy on the labelled evaluation set, and agreement with the teacher.

It prints one row per device and the largest difference between the devices' trained
weights (float32 rounding differs between devices; the figures should agree closely).

Usage::

    python bench/distill_device.py [--devices cpu,cuda] [--steps 200] [--batch 64] [--out DIR]

Needs torch (the ``train`` extra, or a CUDA build on a GPU machine).
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


def accuracy(model_path: Path, x: np.ndarray, labels: np.ndarray, teacher_top1: np.ndarray | None) -> tuple[float, float | None]:
    from onnxshrink.runtime import make_session

    session = make_session(str(model_path), threads=1)
    name = session.get_inputs()[0].name
    top1 = np.concatenate([session.run(None, {name: x[i : i + 256]})[0].argmax(axis=1) for i in range(0, len(x), 256)])
    agree = None if teacher_top1 is None else float((top1 == teacher_top1).mean())
    return float((top1 == labels).mean()), agree


def train(device: str, teacher: Path, student: Path, train_x: np.ndarray, steps: int, batch: int, lr: float, out: Path) -> dict:
    import torch

    from onnxshrink.distill import DistillationHook

    torch.manual_seed(0)
    hook = DistillationHook(teacher, student, temperature=4.0)
    hook.student.to(device)
    optimizer = torch.optim.Adam(hook.parameters(), lr=lr)
    name = hook.input_names[0]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_x))
    times, losses = [], []
    for step in range(steps):
        pick = order[(step * batch) % len(order) :][:batch]
        if len(pick) < batch:
            pick = np.concatenate([pick, order[: batch - len(pick)]])
        feeds = {name: torch.from_numpy(train_x[pick]).to(device)}
        teacher_out = hook.teacher_outputs({name: train_x[pick]})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = hook.loss(feeds, teacher_out)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    path = hook.export(out / f"student_{device.replace(':', '_')}.onnx")
    weights = {n: p.detach().to("cpu").numpy().copy() for n, p in hook.student.named_weights()}
    return {
        "device": device,
        "ms_per_step_median": round(1000 * float(np.median(times[1:] or times)), 2),
        "first_loss": round(losses[0], 5),
        "last_loss_mean10": round(float(np.mean(losses[-10:])), 5),
        "path": str(path),
        "weights": weights,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--teacher", default=str(SAMPLES / "resnet_mini.onnx"))
    parser.add_argument("--train", default=str(SAMPLES / "digits_train.npz"))
    parser.add_argument("--eval", default=str(SAMPLES / "digits_eval.npz"))
    parser.add_argument("--ratio", type=float, default=0.5, help="channel-pruning ratio of the student")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="/tmp/onnxshrink-distill-device")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from onnxshrink.modelio import load_model, save_model
    from onnxshrink.prune import ChannelPruneConfig, prune_channels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher)
    model, _ = load_model(teacher)
    prune_channels(model, ChannelPruneConfig(ratio=args.ratio))
    student = save_model(model, out / "student_pruned.onnx")
    with np.load(args.train) as npz:
        train_x = npz[next(k for k in npz.files if k != "labels")].astype(np.float32)
    with np.load(args.eval) as npz:
        eval_x, eval_y = npz[next(k for k in npz.files if k != "labels")].astype(np.float32), npz["labels"]
    teacher_acc, _ = accuracy(teacher, eval_x, eval_y, None)
    from onnxshrink.runtime import make_session

    session = make_session(str(teacher), threads=1)
    iname = session.get_inputs()[0].name
    teacher_top1 = np.concatenate([session.run(None, {iname: eval_x[i : i + 256]})[0].argmax(axis=1) for i in range(0, len(eval_x), 256)])
    pruned_acc, pruned_agree = accuracy(student, eval_x, eval_y, teacher_top1)

    devices = [d for d in args.devices.split(",") if d]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print("distill_device: CUDA is not available here; skipping the cuda devices", file=sys.stderr)
        devices = [d for d in devices if not d.startswith("cuda")]
    print(f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(f"teacher {teacher.name}: top-1 {100 * teacher_acc:.2f}%; student (channels pruned at {args.ratio}): "
          f"top-1 {100 * pruned_acc:.2f}%, agreement with the teacher {100 * (pruned_agree or 0):.2f}%")  # fmt: skip
    rows = []
    for device in devices:
        row = train(device, teacher, student, train_x, args.steps, args.batch, args.lr, out)
        row["top1"], row["agreement"] = accuracy(Path(row["path"]), eval_x, eval_y, teacher_top1)
        rows.append(row)
        print(f"{device:8s} {row['ms_per_step_median']:8.2f} ms/step  loss {row['first_loss']:.4f} -> {row['last_loss_mean10']:.4f}  "
              f"exported student: top-1 {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%")  # fmt: skip
    if len(rows) > 1:
        ref = rows[0]["weights"]
        for row in rows[1:]:
            diff = max(float(np.abs(ref[n] - row["weights"][n]).max()) for n in ref)
            scale = max(float(np.abs(ref[n]).max()) for n in ref)
            print(f"largest weight difference {rows[0]['device']} vs {row['device']}: {diff:.3g} (largest weight {scale:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "teacher_top1": teacher_acc, "pruned_top1": pruned_acc,
            "rows": [{k: v for k, v in r.items() if k != "weights"} for r in rows],
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
