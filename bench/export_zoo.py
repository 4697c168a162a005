#!/usr/bin/env python3
"""Export the onnxshrink benchmark zoo: 12 torchvision CNNs as fp32 ONNX files.

Every model is built with default random initialisation (``weights=None``,
``torch.manual_seed(0)`` before construction), put in eval mode and exported
with the legacy TorchScript exporter (``dynamo=False``, opset 17,
``do_constant_folding=True``).  The single input is named ``input``
(1x3x224x224; 1x3x299x299 for inception_v3), the single output ``output``,
and dimension 0 of both is dynamic and named ``batch``.

The script also writes seeded synthetic input sets next to the models
(standard-normal float32 clipped to [-3, 3], generated with numpy so any
consumer can regenerate them without torch; key ``input``):

* ``calib512.npz``  (512x3x224x224, seed 20240)  -- large calibration set
* ``calib32.npz``   (first 32 rows of calib512)  -- small calibration set
* ``eval32.npz``    (32x3x224x224, seed 20241)   -- held-back evaluation set,
  disjoint from both calibration sets
* ``*_299.npz``     the same three for inception_v3 (seeds 20299 / 20300)

Usage::

    python bench/export_zoo.py [--out /work/zoo] [--models a,b] [--force]

Optional: ``--bn-recalib N`` re-estimates BatchNorm running statistics on N
seeded inputs before export (see recalibrate_bn); write such a zoo to another
folder, it is not the standard zoo.

Needs torch and torchvision (the bench venv, see bench/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "squeezenet1_1",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "densenet121",
    "inception_v3",
    "convnext_tiny",
    "vgg16",
]

OPSET = 17

# input size -> {set name: numpy seed}; calib32 is the first 32 rows of calib512.
DATASETS = {
    224: {"calib512": 20240, "eval32": 20241},
    299: {"calib512": 20299, "eval32": 20300},
}


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def make_inputs(n: int, size: int, seed: int) -> np.ndarray:
    """Seeded standard-normal NCHW float32 inputs clipped to [-3, 3]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    np.clip(x, -3.0, 3.0, out=x)
    return x


def write_datasets(out: str, force: bool) -> list[tuple[str, tuple, float]]:
    written = []
    for size, seeds in DATASETS.items():
        suffix = "" if size == 224 else f"_{size}"
        p512 = os.path.join(out, f"calib512{suffix}.npz")
        p32 = os.path.join(out, f"calib32{suffix}.npz")
        pev = os.path.join(out, f"eval32{suffix}.npz")
        if force or not (os.path.exists(p512) and os.path.exists(p32)):
            x = make_inputs(512, size, seeds["calib512"])
            np.savez(p512, input=x)
            np.savez(p32, input=np.ascontiguousarray(x[:32]))
            written += [(p512, x.shape), (p32, x[:32].shape)]
        if force or not os.path.exists(pev):
            x = make_inputs(32, size, seeds["eval32"])
            np.savez(pev, input=x)
            written.append((pev, x.shape))
    return written


def build(name: str):
    import torch
    import torchvision.models as tvm

    torch.manual_seed(0)
    if name == "inception_v3":
        try:
            m = tvm.inception_v3(weights=None, aux_logits=False, init_weights=True)
        except Exception as e:  # pragma: no cover - older/newer torchvision
            print(f"  inception_v3(aux_logits=False) failed ({e}); using defaults", file=sys.stderr)
            torch.manual_seed(0)
            m = tvm.inception_v3(weights=None, init_weights=True)
    else:
        m = getattr(tvm, name)(weights=None)
    return m.eval()


BN_SEED = 20250  # inputs used only for --bn-recalib (disjoint from calib/eval sets)


def recalibrate_bn(model, name: str, n: int, batch: int = 32) -> int:
    """Re-estimate BatchNorm running statistics on ``n`` seeded inputs.

    Random init leaves every BN at running_mean=0 / running_var=1, so in eval
    mode BN does not normalise and activations vanish or explode with depth
    (fp32 logits ~1e-14 for efficientnet_b0, ~1e12 for inception_v3).  This
    puts only the BN modules in train mode, resets their statistics to a
    cumulative average (momentum=None), runs the inputs through under no_grad
    and returns to eval mode.  Weights are unchanged.  Returns the number of
    BN modules touched (0 for models without BN: squeezenet, vgg16, convnext).
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or n <= 0:
        return 0
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    x = make_inputs(n, input_size(name), BN_SEED)
    with torch.no_grad():
        for i in range(0, n, batch):
            model(torch.from_numpy(x[i : i + batch]))
    return len(bns)


def export_one(name: str, path: str, bn_recalib: int = 0):
    """Export ``name`` to ``path``; return the eval-mode torch module."""
    import torch

    model = build(name)
    if bn_recalib:
        recalibrate_bn(model, name, bn_recalib)
    model.eval()
    size = input_size(name)
    dummy = torch.zeros(1, 3, size, size, dtype=torch.float32)
    tmp = path + ".tmp"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            tmp,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    os.replace(tmp, path)
    return model


def verify_one(model, name: str, path: str) -> str:
    """Compare ORT (fp32, batch 2) against torch on seeded inputs."""
    import onnxruntime as ort
    import torch

    x = make_inputs(2, input_size(name), 7)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    err = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref))) or 1.0
    return f"ort-vs-torch max|d|={err:.2e} (max|ref|={scale:.2e})"


def check_one(path: str) -> str:
    import onnx

    m = onnx.load(path)
    onnx.checker.check_model(m)
    inp = m.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    return f"{inp.name}{dims} opset={m.opset_import[0].version} nodes={len(m.graph.node)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/zoo", help="output folder (default /work/zoo)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--force", action="store_true", help="re-export models / rewrite data that exist")
    ap.add_argument("--bn-recalib", type=int, default=0, metavar="N",
                    help="re-estimate BatchNorm running stats on N seeded inputs before export "
                         "(default 0 = plain random init as required for the standard zoo; "
                         "use a different --out)")
    ap.add_argument("--no-verify", action="store_true", help="skip the ORT-vs-torch check of new exports")
    ap.add_argument("--no-data", action="store_true", help="do not write the calibration/eval .npz files")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; known: {MODELS}")
    os.makedirs(args.out, exist_ok=True)

    import torch
    import torchvision

    print(f"torch {torch.__version__}  torchvision {torchvision.__version__}  opset {OPSET}  out {args.out}"
          f"  bn_recalib {args.bn_recalib}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    if not args.no_data:
        for p, shape in write_datasets(args.out, args.force):
            print(f"wrote {p} {shape}")

    rows = []
    failed = 0
    for name in names:
        path = os.path.join(args.out, f"{name}.onnx")
        if os.path.exists(path) and not args.force:
            rows.append((name, os.path.getsize(path), None, "skipped (exists)"))
            continue
        t0 = time.perf_counter()
        try:
            model = export_one(name, path, args.bn_recalib)
            dt = time.perf_counter() - t0
            info = check_one(path)
            if not args.no_verify:
                info += "  " + verify_one(model, name, path)
            rows.append((name, os.path.getsize(path), dt, info))
        except Exception as e:
            failed += 1
            rows.append((name, None, time.perf_counter() - t0, f"FAILED: {type(e).__name__}: {e}"))
        print(f"  {name}: {rows[-1][3]}", flush=True)

    print()
    print(f"{'model':<20} {'size MB':>9} {'export s':>9}  note")
    print("-" * 78)
    for name, size, dt, note in rows:
        s = f"{size / 1e6:9.1f}" if size is not None else f"{'-':>9}"
        t = f"{dt:9.1f}" if dt is not None else f"{'-':>9}"
        print(f"{name:<20} {s} {t}  {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
