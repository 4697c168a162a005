#!/usr/bin/env python3
"""Coverage-guided fuzz target for the load -> prepare -> prune/int8 -> save path.

Each input is the bytes of a model file. It is written to a scratch folder and given to
:func:`onnxshrink.shrink.shrink` (random calibration, no timing), which loads and vets it,
runs the lossless preparation passes, prunes and/or quantizes, and saves atomically. The
pipeline variant is picked from a hash of the input, so every input always takes the same
path. A :class:`~onnxshrink.errors.ShrinkError` is a correct refusal; any other exception is
a crash, and an input that runs longer than ``-timeout`` seconds is a hang.

Crashes already reported and still open are listed in ``fuzz/known_crashes.json`` by their
signature (exception type and the innermost onnxshrink function); they are counted on stderr
instead of stopping the run, so that a long run keeps looking for new ones. Set
``ONNXSHRINK_FUZZ_STRICT=1`` to stop on them too.

Most byte-level mutations of a protobuf die in the parser, so half of the mutations are
structure-aware: the input is parsed as a ``ModelProto`` and one field that the passes care
about is changed (an op type, an attribute, a dim, a dtype, an opset, a wiring, NaN weights).

Usage (see fuzz/README.md):
    python fuzz/fuzz_load_shrink.py CORPUS_DIR [SEED_DIR] -timeout=60 -rss_limit_mb=4096
    python fuzz/fuzz_load_shrink.py --repro CRASH_FILE     # run one input, show the traceback
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
import warnings
import zlib
from collections import Counter
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["onnxshrink"]):
    from onnxshrink.errors import ShrinkError
    from onnxshrink.prune import ChannelPruneConfig, MagnitudePruneConfig
    from onnxshrink.quantize import Int8Config
    from onnxshrink.shrink import ShrinkOptions, shrink

import onnx
from onnx import TensorProto

_SCRATCH = Path(tempfile.mkdtemp(prefix="onnxshrink-fuzz-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
KNOWN_FILE = Path(__file__).resolve().parent / "known_crashes.json"
STRICT = os.environ.get("ONNXSHRINK_FUZZ_STRICT") == "1"
#: How often each known (reported, open) crash signature was hit in this process.
known_hits: Counter[str] = Counter()


def load_known() -> dict[str, dict[str, str]]:
    """Open crash reports: signature -> {reproducer, owner, note}."""
    if not KNOWN_FILE.exists():
        return {}
    return {entry["signature"]: entry for entry in json.loads(KNOWN_FILE.read_text())["open"]}


def signature(exc: BaseException) -> str:
    """``Type in onnxshrink/module.py:function`` of the innermost onnxshrink frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/onnxshrink/" in f.filename.replace(os.sep, "/")]
    where = (ours or frames or [None])[-1]
    if where is None:
        return type(exc).__name__
    module = "onnxshrink/" + where.filename.replace(os.sep, "/").rsplit("/onnxshrink/", 1)[-1] if ours else Path(where.filename).name
    return f"{type(exc).__name__} in {module}:{where.name}"


_KNOWN = load_known()

#: The pipeline variants; an input's CRC picks one.
VARIANTS = (
    ShrinkOptions(calibration="random", measure_latency=False),
    ShrinkOptions(
        calibration="random",
        measure_latency=False,
        int8=Int8Config(method="minmax", per_channel=False, fusion_aware=False, activation_type="int8"),
    ),
    ShrinkOptions(calibration="random", measure_latency=False, channels=ChannelPruneConfig(ratio=0.5)),
    ShrinkOptions(quantize=None, calibration="random", measure_latency=False, magnitude=MagnitudePruneConfig(sparsity=0.5)),
)


#: Inputs whose declared feeds hold more elements than this are skipped: the per-input timeout
#: is there to catch hangs, not the honest cost of calibrating on large random feeds (a 64 x
#: 220,000 MaxPool takes ~35 s uninstrumented). Single runs stay bounded by the product's own
#: ONNXSHRINK_MAX_RUN_SECONDS, set low below.
MAX_FEED_ELEMENTS = 1 << 20


def _feeds_too_large(data: bytes) -> bool:
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:  # noqa: BLE001 - malformed bytes are shrink's to refuse
        return False
    for value in model.graph.input:
        if value.type.HasField("tensor_type"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
            if math.prod(dims) > MAX_FEED_ELEMENTS:
                return True
    return False


def run_one(data: bytes) -> None:
    """The property under test: ``shrink`` either succeeds or raises a ShrinkError."""
    if _feeds_too_large(data):
        return
    folder = _SCRATCH / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    model_path = folder / "model.onnx"
    model_path.write_bytes(data)
    options = VARIANTS[zlib.crc32(data) % len(VARIANTS)]
    try:
        shrink(model_path, folder / "out.onnx", options)
    except ShrinkError:
        return
    except Exception as exc:  # noqa: BLE001 - a crash, unless it is reported and open
        sig = signature(exc)
        if STRICT or sig not in _KNOWN:
            raise
        known_hits[sig] += 1
        if known_hits[sig] in (1, 10, 100, 1000):
            print(f"known crash (open, not stopping) x{known_hits[sig]}: {sig}", file=sys.stderr)


# ----------------------------------------------------------------- structure-aware mutation

_OPS = [
    "Add", "Mul", "Relu", "Conv", "MatMul", "Gemm", "Reshape", "Transpose", "Concat", "Slice",
    "BatchNormalization", "ReduceMean", "GlobalAveragePool", "MaxPool", "AveragePool", "Identity",
    "Softmax", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Cast", "Pad", "Resize", "Sigmoid",
    "LayerNormalization", "Split", "Where", "Loop", "If", "Constant", "QuantizeLinear",
    "DequantizeLinear", "ConvTranspose", "Expand", "Tile", "Shape", "NotAnOp",
]
_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, -(2**31), 2**40, 2**63 - 1]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, float("inf"), float("-inf"), float("nan")]
_TYPES = [
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32,
    TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, 0, 99,
]  # fmt: skip


def _mutate_attribute(node: onnx.NodeProto, rng: random.Random) -> None:
    if not node.attribute or rng.random() < 0.2:
        attr = node.attribute.add()
        attr.name = rng.choice(["axis", "axes", "keepdims", "group", "pads", "strides", "perm", "epsilon", "to", "kernel_shape"])
        attr.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT])
    attr = rng.choice(node.attribute)
    if attr.type == onnx.AttributeProto.INT:
        attr.i = rng.choice(_INTS + [attr.i + 1, attr.i - 1])
    elif attr.type == onnx.AttributeProto.INTS:
        values = list(attr.ints) or [1]
        values[rng.randrange(len(values))] = rng.choice(_INTS)
        if rng.random() < 0.3:
            values.append(rng.choice(_INTS))
        del attr.ints[:]
        attr.ints.extend(values)
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = rng.choice(_FLOATS)
    elif attr.type == onnx.AttributeProto.GRAPH and attr.g.node:
        _mutate_graph(attr.g, rng)
    else:
        attr.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING])


def _mutate_graph(graph: onnx.GraphProto, rng: random.Random) -> None:
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]
    choice = rng.randrange(11)
    if choice == 0 and graph.node:
        rng.choice(graph.node).op_type = rng.choice(_OPS)
    elif choice in (1, 2) and graph.node:
        _mutate_attribute(rng.choice(graph.node), rng)
    elif choice == 3 and graph.node and names:
        node = rng.choice(graph.node)
        if node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(names + [""])
        else:
            node.input.append(rng.choice(names))
    elif choice == 4 and graph.node:
        del graph.node[rng.randrange(len(graph.node))]
    elif choice == 5 and graph.node:
        graph.node.insert(rng.randrange(len(graph.node) + 1), rng.choice(graph.node))
    elif choice == 6 and graph.initializer:
        t = rng.choice(graph.initializer)
        if t.data_type == TensorProto.FLOAT and len(t.raw_data) >= 4:
            raw = bytearray(t.raw_data)
            pos = rng.randrange(len(raw) // 4) * 4
            raw[pos:pos + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f", b"\x00\x00\x00\x00"])
            t.raw_data = bytes(raw)
        elif t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice(_INTS)
    elif choice == 7:
        values = list(graph.input) + list(graph.output) + list(graph.value_info)
        if values:
            tt = rng.choice(values).type.tensor_type
            if rng.random() < 0.5 or not tt.shape.dim:
                tt.elem_type = rng.choice(_TYPES)
            else:
                dim = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
                if rng.random() < 0.5:
                    dim.dim_param = rng.choice(["N", "batch", ""])
                else:
                    dim.dim_value = rng.choice([0, 1, 2, 3, 5, 64, 2**40])
    elif choice == 8 and graph.initializer:
        t = rng.choice(graph.initializer)
        t.data_type = rng.choice(_TYPES)
    elif choice == 9 and graph.output and names:
        graph.output[rng.randrange(len(graph.output))].name = rng.choice(names)
    elif graph.node:
        node = rng.choice(graph.node)
        if node.output:
            node.output[rng.randrange(len(node.output))] = rng.choice(names + ["fresh"])


def mutate_model(data: bytes, rng: random.Random) -> bytes | None:
    """One structural mutation of ``data`` as a ModelProto, or None if it does not parse."""
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:  # noqa: BLE001 - not a model: let the byte mutator have it
        return None
    try:
        if not model.HasField("graph"):
            return None
        if rng.random() < 0.15 and model.opset_import:
            model.opset_import[0].version = rng.choice([7, 11, 12, 13, 17, 18, 21, 23, 99, model.opset_import[0].version + 1])
        elif rng.random() < 0.05:
            model.ir_version = rng.choice([1, 3, 7, 10, 11, 99])
        else:
            _mutate_graph(model.graph, rng)
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 in a name (upb checks strings lazily)
        return None


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        mutated = mutate_model(data, rng)
        if mutated is not None and len(mutated) <= max_size:
            return mutated
    return atheris.Mutate(data, max_size)


def test_one_input(data: bytes) -> None:
    from onnxshrink.runtime import CrashProbe

    stalls = CrashProbe.stalls
    run_one(data)
    if CrashProbe.stalls != stalls:  # skipped by the product, but the run must show it
        print(f"onnxshrink-fuzz: crash probe child stalled and was skipped (x{CrashProbe.stalls} so far)", file=sys.stderr, flush=True)


def _quiet() -> None:
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The product's bounds on one onnxruntime run, tight enough for a 60 s per-input timeout.
    os.environ.setdefault("ONNXSHRINK_MAX_RUN_SECONDS", "10")
    os.environ.setdefault("ONNXSHRINK_MAX_MEMORY", "2G")


def main() -> None:
    _quiet()
    if len(sys.argv) == 3 and sys.argv[1] == "--repro":
        run_one(Path(sys.argv[2]).read_bytes())
        print("no crash")
        return
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
