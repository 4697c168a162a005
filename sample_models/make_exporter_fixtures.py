#!/usr/bin/env python
"""Regenerate the tiny exporter fixtures in ``tests/data/exporters/``.

Usage (from the repository root)::

    python sample_models/make_exporter_fixtures.py

These are untrained, randomly initialised (seeded) tiny conv nets whose only
purpose is to exercise model loading across exporter flavours:

* ``legacy_opset11.onnx`` - TorchScript ("legacy") exporter, opset 11,
  default settings (so BatchNorm is folded into the Conv), dynamic batch.
* ``dynamo_external/model.onnx`` + ``dynamo_external/model.onnx.data`` -
  torch.export ("dynamo") exporter, opset 18, all weights in an external
  data file, static input shape.
* ``constant_weights.onnx`` - ``legacy_opset11.onnx`` with every initializer
  turned into a ``Constant`` node (the way PaddlePaddle-style exports store
  weights); the graph has no initializers.
* ``<name>_io.npz`` for each: a fixed random input under the model's input
  name and the output computed by torch under ``expected``.

The script checks each model with onnx.checker and onnxruntime before it
exits; it fails if the ORT output differs from torch's by more than 1e-4.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "exporters"
SEED = 1234
ATOL = 1e-4


class TinyNet(nn.Module):
    """Conv-BN-ReLU, Conv(stride 2)-ReLU, global average pool, Linear. 1,476 params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_model(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    # Non-trivial BatchNorm statistics so a wrong BN fold would show.
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    return model.eval()


def fixed_input(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@torch.no_grad()
def torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def check_with_ort(path: Path, io_path: Path) -> None:
    import onnxruntime as ort

    # Path-based checks so external data is resolved relative to the model.
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    io = np.load(io_path)
    (inp,) = sess.get_inputs()
    got = sess.run(None, {inp.name: io[inp.name]})[0]
    diff = float(np.abs(got - io["expected"]).max())
    print(f"  {path.relative_to(REPO)}: input {inp.name!r} {io[inp.name].shape}, max|ort-torch| {diff:.2e}")
    if diff > ATOL:
        raise SystemExit(f"{path}: onnxruntime output differs from torch by {diff}")


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
    return ctx


def make_legacy_opset11() -> Path:
    model = make_model(SEED)
    x = fixed_input(SEED, (2, 3, 16, 16))
    path = OUT / "legacy_opset11.onnx"
    ctx = quiet()
    try:
        torch.onnx.export(
            model,
            (torch.from_numpy(x),),
            str(path),
            dynamo=False,
            opset_version=11,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    finally:
        ctx.__exit__(None, None, None)
    np.savez_compressed(OUT / "legacy_opset11_io.npz", input=x, expected=torch_out(model, x))
    return path


def make_dynamo_external() -> Path:
    model = make_model(SEED + 1)
    x = fixed_input(SEED + 1, (1, 3, 16, 16))
    folder = OUT / "dynamo_external"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    path = folder / "model.onnx"
    ctx = quiet()
    try:
        # ONNXProgram.save(..., external_data=True) (what torch.onnx.export
        # does by default in torch 2.13 when given a file name) writes
        # "<name>.data" next to the model, moving the larger tensors (here the
        # two conv weights) out and keeping tiny ones (biases, the Linear
        # weight, shape/axes constants) inline. We rely on that rather than
        # onnx.save_model(..., size_threshold=0): the latter also moves the
        # int64 axes/shape constants out, and then onnx shape inference
        # (onnx.checker full_check) fails with "Cannot parse data from
        # external tensors".
        program = torch.onnx.export(model, (torch.from_numpy(x),), dynamo=True, opset_version=18)
    finally:
        ctx.__exit__(None, None, None)
    # Per-node stack traces hold absolute paths of this checkout: drop them so
    # the bytes do not depend on where the script ran.
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    program.save(str(path), external_data=True)
    loaded = onnx.load(str(path), load_external_data=False)
    input_name = loaded.graph.input[0].name
    np.savez_compressed(OUT / "dynamo_external_io.npz", **{input_name: x, "expected": torch_out(model, x)})
    external = [t for t in loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert external and locations == {"model.onnx.data"}, locations
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    print(f"  dynamo_external: {len(external)}/{len(loaded.graph.initializer)} initializers external")
    return path


def make_constant_weights(legacy_path: Path) -> Path:
    """Copy of the legacy model with initializers replaced by Constant nodes."""
    model = onnx.load(str(legacy_path))
    graph = model.graph
    const_nodes = [
        helper.make_node(
            "Constant",
            inputs=[],
            outputs=[init.name],
            name=f"const_{i}",
            value=numpy_helper.from_array(numpy_helper.to_array(init), name=init.name),
        )
        for i, init in enumerate(graph.initializer)
    ]
    init_names = {init.name for init in graph.initializer}
    new_graph = helper.make_graph(
        nodes=const_nodes + list(graph.node),
        name=graph.name + "_constant_weights",
        inputs=[i for i in graph.input if i.name not in init_names],
        outputs=list(graph.output),
        initializer=[],
        value_info=list(graph.value_info),
    )
    new_model = helper.make_model(
        new_graph,
        opset_imports=list(model.opset_import),
        producer_name="onnxshrink-fixtures",
        producer_version="1",
        doc_string="Weights stored as Constant nodes (PaddlePaddle-style), built from legacy_opset11.onnx",
    )
    new_model.ir_version = model.ir_version
    path = OUT / "constant_weights.onnx"
    onnx.save_model(new_model, str(path))
    io = np.load(OUT / "legacy_opset11_io.npz")
    np.savez_compressed(OUT / "constant_weights_io.npz", input=io["input"], expected=io["expected"])
    assert len(new_model.graph.initializer) == 0
    return path


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    legacy = make_legacy_opset11()
    dynamo = make_dynamo_external()
    const = make_constant_weights(legacy)
    print("fixtures:")
    check_with_ort(legacy, OUT / "legacy_opset11_io.npz")
    check_with_ort(dynamo, OUT / "dynamo_external_io.npz")
    check_with_ort(const, OUT / "constant_weights_io.npz")
    total = 0
    for f in sorted(p for p in OUT.rglob("*") if p.is_file()):
        total += f.stat().st_size
        print(f"  {f.relative_to(REPO)}  {f.stat().st_size} B")
    print(f"  total {total} B")
    if total > 200_000:
        raise SystemExit("fixtures exceed 200 KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
