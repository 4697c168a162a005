"""Safe loading and atomic saving of ONNX models: the only way onnxshrink touches model files.

Model files are untrusted input. Before onnx or onnxruntime sees a byte, :func:`load_model`

* opens the path without blocking and refuses anything but a regular file (a FIFO or a
  device would hang or never end), and files too large for a protobuf;
* parses the protobuf without letting onnx resolve external data, then checks every tensor
  (initializers, ``Constant`` attributes, sparse tensors, subgraphs, functions): declared
  dims are non-negative, the stored bytes match the declared shape exactly, so a tiny file
  cannot make us allocate gigabytes;
* vets each external-data reference: a relative path with no ``..``, no symbolic link on the
  way, a regular file with a single hard link (onnxruntime follows hard links out of the
  folder), and an offset/length inside the file;
* checks opset and IR version ranges and runs the onnx checker.

:func:`save_model` never touches the input, never follows a symlink at the output path, and
writes through temporary files that are ``os.replace``-d into place, so a failure leaves the
previous output intact. External data goes to a file whose name carries a hash of its bytes,
so the model is only ever switched, in one atomic rename, from one complete pair to another.
"""

from __future__ import annotations

import os

# onnxruntime 1.32 writes a telemetry session file ($TMPDIR/.ses) when it is first imported:
# a file written by a command that promises to write nothing but its output. This package is
# imported (by onnxshrink/__init__) before anything of ours imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from onnxshrink.modelio.load import (
    drop_initializer_inputs,
    lift_constant_nodes,
    load_external_data,
    load_model,
    open_regular_file,
    safe_external_path,
)
from onnxshrink.modelio.save import check_output_path, ort_model_source, save_model
from onnxshrink.modelio.tensors import (
    EXTERNAL_DATA_THRESHOLD,
    EXTERNAL_TENSOR_MIN_BYTES,
    MAX_GRAPH_DEPTH,
    MAX_OPSET,
    MIN_OPSET,
    PROTOBUF_LIMIT,
    ModelInfo,
    expected_nbytes,
    external_location,
    has_external_data,
    is_repeated,
    iter_graphs,
    iter_tensors,
    weights_nbytes,
)

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_TENSOR_MIN_BYTES",
    "MAX_GRAPH_DEPTH",
    "MAX_OPSET",
    "MIN_OPSET",
    "PROTOBUF_LIMIT",
    "ModelInfo",
    "check_output_path",
    "drop_initializer_inputs",
    "expected_nbytes",
    "external_location",
    "has_external_data",
    "is_repeated",
    "iter_graphs",
    "iter_tensors",
    "lift_constant_nodes",
    "load_external_data",
    "load_model",
    "open_regular_file",
    "ort_model_source",
    "safe_external_path",
    "save_model",
    "weights_nbytes",
]
