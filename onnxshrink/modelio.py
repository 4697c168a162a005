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

import contextlib
import hashlib
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import (
    ModelLoadError,
    ModelSaveError,
    UnsafeModelError,
    UnsupportedModelError,
)

from onnxshrink.operands import check_required_inputs

log = logging.getLogger(__name__)

# onnxruntime 1.32 writes a telemetry session file ($TMPDIR/.ses) when it is first imported:
# a file written by a command that promises to write nothing but its output. This module is
# imported (by onnxshrink/__init__) before anything of ours imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: A protobuf message cannot exceed 2 GiB; bigger weights must live in external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this total weight size, saved models keep their weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline even when saving with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
#: If/Loop/Scan nesting deeper than this is refused (protects recursive walks).
MAX_GRAPH_DEPTH = 32
#: The lowest default-domain opset we accept; quantization needs per-channel Q/DQ (opset 13)
#: but loading, inspection and pruning work from 11.
MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()

_SUB_BYTE_TYPES = {
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, name)
}
_TMP_MARK = ".onnxshrink-tmp"


@dataclass
class ModelInfo:
    """Where a loaded model came from (kept beside the proto; onnx has no slot for it)."""

    path: Path
    file_bytes: int
    external_files: dict[str, int] = field(default_factory=dict)  # location -> size on disk
    #: Whether loading changed the graph (declared -1 dims cleared, Constant nodes lifted,
    #: weights listed as inputs dropped): then the file is not the model as loaded, e.g. for
    #: onnxruntime, weights listed as inputs are overridable, so it folds nothing into them.
    changed_on_load: bool = False

    @property
    def external_bytes(self) -> int:
        return sum(self.external_files.values())


# --------------------------------------------------------------------------- loading


def open_regular_file(path: str | os.PathLike[str], *, what: str = "model") -> tuple[int, int]:
    """Open ``path`` for reading without blocking and return ``(fd, size)``.

    Raises ModelLoadError unless it is a regular file. ``O_NONBLOCK`` makes opening a FIFO
    return at once (instead of waiting for a writer), and fstat then rejects it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelLoadError(f"{what} file not found", path=path) from None
    except IsADirectoryError:
        raise ModelLoadError(f"is a directory, not a {what} file", path=path) from None
    except PermissionError:
        raise ModelLoadError("permission denied", path=path) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot open: {exc.strerror}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, device or socket?)"
        raise ModelLoadError(f"is {kind}, not a {what} file", path=path)
    return fd, st.st_size


def _read_all(fd: int, size: int) -> bytes:
    # One read gives a regular file whole (no chunks to join: a second copy of the model).
    first = os.read(fd, size)
    chunks = [first]
    remaining = size - len(first)
    while remaining > 0 and chunks[-1]:
        chunks.append(os.read(fd, min(remaining, 1 << 24)))
        remaining -= len(chunks[-1])
    return first if len(chunks) == 1 else b"".join(chunks)


def load_model(
    path: str | os.PathLike[str],
    *,
    load_weights: bool = True,
    lift_constants: bool = True,
    check: bool = True,
) -> tuple[onnx.ModelProto, ModelInfo]:
    """Load and vet an ONNX model file.

    Args:
        path: the ``.onnx`` file.
        load_weights: read external data into the tensors. ``False`` keeps the (vetted)
            references, enough for inspection and cheap even for very large models.
        lift_constants: turn top-level ``Constant`` nodes into initializers, so that weights
            stored as nodes (PaddlePaddle, some tf2onnx graphs) are seen as weights.
        check: run the onnx checker.

    Returns:
        The model and a :class:`ModelInfo` describing its files.

    Raises:
        ModelLoadError, UnsafeModelError, UnsupportedModelError: with the file named.
    """
    path = Path(path)
    fd, size = open_regular_file(path)
    try:
        if size == 0:
            raise ModelLoadError("file is empty", path=path)
        if size > PROTOBUF_LIMIT:
            raise ModelLoadError(
                f"file is {size} bytes, over the 2 GiB protobuf limit; a model this large "
                "must keep its weights in external data",
                path=path,
            )
        blob = _read_all(fd, size)
    finally:
        os.close(fd)
    try:
        model = onnx.ModelProto.FromString(blob)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"not a valid ONNX protobuf ({type(exc).__name__})", path=path) from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelLoadError("not an ONNX model (no graph)", path=path)

    info = ModelInfo(path=path, file_bytes=size)
    _check_text(model, path)
    _check_versions(model, path)
    if _check_declared_shapes(model, path):
        blob = b""  # the loaded copy changed: the checker must see it, not the file
        info.changed_on_load = True
    check_required_inputs(model, list(iter_graphs(model.graph, path=path)), path)
    base_dir = path.resolve().parent
    for tensor, where in iter_tensors(model, path=path):
        _check_tensor(tensor, where, base_dir, info, path)
    if check:
        # The file's bytes, when they are the model as loaded: serialising it again would
        # cost a second copy (0.9 s for VGG-16's 528 MB).
        _run_checker(model, path, blob or None)
    del blob
    if load_weights:
        load_external_data(model, base_dir, path=path)
    if lift_constants and lift_constant_nodes(model.graph):
        info.changed_on_load = True
    if drop_initializer_inputs(model.graph):
        info.changed_on_load = True
    return model, info


def _check_versions(model: onnx.ModelProto, path: Path) -> None:
    if model.ir_version < 3 or model.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"IR version {model.ir_version} is outside the supported range 3-{onnx.IR_VERSION}",
            path=path,
        )
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    uses_default = any(n.domain in ("", "ai.onnx") for n in model.graph.node)
    if not default:
        if uses_default:
            raise ModelLoadError("the graph uses ONNX ops but imports no ONNX opset", path=path)
        return
    opset = default[0]
    if opset > MAX_OPSET:
        raise UnsupportedModelError(
            f"opset {opset} is newer than this onnx supports ({MAX_OPSET}); upgrade onnx "
            "and onnxruntime",
            path=path,
        )
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"opset {opset} is older than {MIN_OPSET}; convert it first, e.g. with "
            "onnx.version_converter.convert_version(model, 13)",
            path=path,
        )


def _check_text(model: onnx.ModelProto, path: Path) -> None:
    """Refuse names and text that are not UTF-8.

    ONNX's strings are proto2, so protobuf does not validate them when parsing: it hands a
    bad one out as ``bytes`` and fails only when something copies it into another message.
    """
    if not _text_is_utf8(model):
        raise ModelLoadError("a name or text field is not valid UTF-8", path=path)


def is_repeated(descriptor: FieldDescriptor) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` from protobuf 6 on, ``label`` before; 7 removed ``label``)."""
    return descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == descriptor.LABEL_REPEATED


def _text_is_utf8(message: Message) -> bool:
    if isinstance(message, onnx.TensorProto):
        # Only its text: listing all its fields would copy the weights out of raw_data.
        texts = [message.name, message.doc_string, *(t for e in message.external_data for t in (e.key, e.value))]
        return not any(isinstance(t, bytes) for t in texts)
    for descriptor, value in message.ListFields():
        repeated = is_repeated(descriptor)
        if descriptor.message_type is not None:
            if not all(_text_is_utf8(item) for item in (value if repeated else (value,))):
                return False
        elif descriptor.type == descriptor.TYPE_STRING and any(isinstance(v, bytes) for v in (value if repeated else (value,))):
            return False
    return True


def _check_declared_shapes(model: onnx.ModelProto, path: Path) -> bool:
    """Read a negative declared dim (input, output or intermediate) as unknown.

    Older exporters (keras2onnx, some tf2onnx versions) and onnxruntime's own optimiser write
    -1 for "unknown"; onnxruntime accepts it. Only the loaded copy changes, never the file.
    Negative dims of stored tensors are refused elsewhere: their byte size would be wrong.
    Returns whether anything changed.
    """
    changed = False
    for graph in iter_graphs(model.graph, path=path):
        for values in (graph.input, graph.output, graph.value_info):
            for value in values:
                if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                    continue
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_value") and dim.dim_value < 0:
                        dim.ClearField("dim_value")
                        changed = True
    return changed


def _run_checker(model: onnx.ModelProto, path: Path, serialized: bytes | None = None) -> None:
    # Given a path, the checker resolves external data beside the model (not the cwd);
    # the file and its external data have been vetted by now.
    try:
        if has_external_data(model):
            onnx.checker.check_model(str(path), full_check=False)
        else:
            onnx.checker.check_model(serialized if serialized is not None else model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"fails the ONNX checker: {first}", path=path) from None
    except Exception as exc:  # noqa: BLE001 - checker raises C++ errors of several types
        raise ModelLoadError(f"fails the ONNX checker: {exc}".splitlines()[0], path=path) from None


def iter_graphs(graph: onnx.GraphProto, *, depth: int = 0, path: Path | None = None) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every subgraph (If/Loop/Scan bodies), refusing absurd nesting."""
    if depth > MAX_GRAPH_DEPTH:
        raise UnsafeModelError(f"subgraphs are nested more than {MAX_GRAPH_DEPTH} deep", path=path)
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, depth=depth + 1, path=path)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g, depth=depth + 1, path=path)


def iter_tensors(model: onnx.ModelProto, *, path: Path | None = None) -> Iterator[tuple[TensorProto, str]]:
    """Yield every stored tensor in the model with a short description of where it is."""

    def from_nodes(nodes: Iterator[onnx.NodeProto] | list[onnx.NodeProto]) -> Iterator[tuple[TensorProto, str]]:
        for node in nodes:
            for attr in node.attribute:
                where = f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t, where
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t, where
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values, where
                    yield attr.sparse_tensor.indices, where
                elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for st in attr.sparse_tensors:
                        yield st.values, where
                        yield st.indices, where

    for graph in iter_graphs(model.graph, path=path):
        for t in graph.initializer:
            yield t, f"initializer '{t.name}'"
        for st in graph.sparse_initializer:
            yield st.values, f"sparse initializer '{st.values.name}'"
            yield st.indices, f"sparse initializer '{st.values.name}' indices"
        yield from from_nodes(graph.node)
    for fn in model.functions:
        yield from from_nodes(fn.node)


def expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's raw data must hold for its declared dims, or None for strings."""
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_type in _SUB_BYTE_TYPES:
        bits = 2 if tensor.data_type in {getattr(TensorProto, n, -1) for n in ("INT2", "UINT2")} else 4
        return (count * bits + 7) // 8
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - unknown or undefined type
        raise ValueError(f"unknown tensor data type {tensor.data_type}") from None
    return count * itemsize


def _typed_field_count(tensor: TensorProto) -> tuple[int, int]:
    """(number of values stored in typed fields, values the dims need in that field)."""
    count = 1
    for d in tensor.dims:
        count *= d
    dt = tensor.data_type
    if dt in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        count *= 2
    stored = (
        len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data)
        + len(tensor.double_data) + len(tensor.uint64_data) + len(tensor.string_data)
    )
    if dt in _SUB_BYTE_TYPES:
        count = (count + 1) // 2  # two 4-bit values per int32 slot
    return stored, count


def _check_tensor(tensor: TensorProto, where: str, base_dir: Path, info: ModelInfo, path: Path) -> None:
    if any(d < 0 for d in tensor.dims):
        raise UnsafeModelError(f"{where} has a negative dimension {list(tensor.dims)}", path=path)
    if math.prod(d for d in tensor.dims if d) * 16 >= 2**63:
        # Empty (a zero dim), so no bytes to mismatch, yet no array of that shape can exist:
        # numpy refuses to make one (found by fuzzing: [2**63 - 1, 0] as a graph output).
        raise UnsafeModelError(f"{where} declares shape {list(tensor.dims)}, beyond what any array can hold", path=path)
    if tensor.HasField("segment"):
        raise UnsupportedModelError(f"{where} is a segmented tensor, which is not supported", path=path)
    try:
        need = expected_nbytes(tensor)
    except ValueError as exc:
        raise UnsupportedModelError(f"{where}: {exc}", path=path) from None
    if tensor.data_location == TensorProto.EXTERNAL:
        _check_external(tensor, where, need, base_dir, info, path)
        return
    if tensor.HasField("raw_data"):
        if need is not None and len(tensor.raw_data) != need:
            raise UnsafeModelError(
                f"{where} declares shape {list(tensor.dims)} ({need} bytes) but stores "
                f"{len(tensor.raw_data)} bytes",
                path=path,
            )
        return
    stored, want = _typed_field_count(tensor)
    if stored != want:
        raise UnsafeModelError(
            f"{where} declares shape {list(tensor.dims)} ({want} values) but stores {stored}",
            path=path,
        )


def external_location(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _check_external(
    tensor: TensorProto, where: str, need: int | None, base_dir: Path, info: ModelInfo, path: Path
) -> None:
    ext = external_location(tensor)
    location = ext.get("location", "")
    if need is None:
        raise UnsupportedModelError(f"{where}: string tensors cannot be external", path=path)
    try:
        offset = int(ext.get("offset", "0"))
        length = int(ext["length"]) if "length" in ext else need
    except ValueError:
        raise UnsafeModelError(f"{where} has a non-numeric external offset/length", path=path) from None
    if offset < 0 or length < 0:
        raise UnsafeModelError(f"{where} has a negative external offset/length", path=path)
    if length != need:
        raise UnsafeModelError(
            f"{where} declares shape {list(tensor.dims)} ({need} bytes) but its external "
            f"length is {length}",
            path=path,
        )
    data_path = safe_external_path(location, base_dir, model_path=path)
    size = info.external_files.get(location)
    if size is None:
        size = _vet_external_file(data_path, location, path)
        info.external_files[location] = size
    if offset + length > size:
        raise UnsafeModelError(
            f"{where}: external data '{location}' range {offset}+{length} exceeds its size {size}",
            path=path,
        )


def safe_external_path(location: str, base_dir: Path, *, model_path: Path) -> Path:
    """Resolve an external-data location inside ``base_dir`` or raise UnsafeModelError."""
    if not location:
        raise UnsafeModelError("external data without a location", path=model_path)
    if "\x00" in location or "\\" in location or location.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", location):
        raise UnsafeModelError(f"external data location '{location}' is an absolute or odd path", path=model_path)
    parts = Path(location).parts
    if any(p == ".." for p in parts):
        raise UnsafeModelError(f"external data location '{location}' goes outside the model folder", path=model_path)
    # Walk each component with lstat: no symbolic link anywhere on the way.
    current = base_dir
    for part in parts:
        if part in ("", "."):
            continue
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise ModelLoadError(f"external data file '{location}' not found", path=model_path) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeModelError(f"external data location '{location}' goes through a symbolic link", path=model_path)
    resolved = current.resolve()
    if base_dir != resolved and base_dir not in resolved.parents:
        raise UnsafeModelError(f"external data location '{location}' resolves outside the model folder", path=model_path)
    return current


def _vet_external_file(data_path: Path, location: str, model_path: Path) -> int:
    st = os.lstat(data_path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeModelError(f"external data '{location}' is not a regular file", path=model_path)
    if st.st_nlink != 1:
        raise UnsafeModelError(
            f"external data '{location}' is a hard link ({st.st_nlink} names); refused because "
            "it may point outside the model folder",
            path=model_path,
        )
    return st.st_size


def load_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike[str], *, path: Path | None = None) -> None:
    """Read every (already vetted) external tensor into ``raw_data``, in place."""
    base_dir = Path(base_dir)
    path = path or base_dir
    fds: dict[str, int] = {}
    try:
        for tensor, where in iter_tensors(model, path=path):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            ext = external_location(tensor)
            location = ext["location"]
            fd = fds.get(location)
            if fd is None:
                data_path = safe_external_path(location, base_dir, model_path=path)
                flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
                try:
                    fd = os.open(data_path, flags)
                except OSError as exc:
                    raise UnsafeModelError(f"cannot open external data '{location}': {exc.strerror}", path=path) from None
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    os.close(fd)
                    raise UnsafeModelError(f"external data '{location}' is not a plain regular file", path=path)
                fds[location] = fd
            offset = int(ext.get("offset", "0"))
            need = expected_nbytes(tensor) or 0
            data = os.pread(fd, need, offset)
            if len(data) != need:
                raise UnsafeModelError(f"{where}: external data '{location}' is shorter than declared", path=path)
            tensor.raw_data = data
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
    finally:
        for fd in fds.values():
            os.close(fd)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t, _ in iter_tensors(model))


def lift_constant_nodes(graph: onnx.GraphProto) -> int:
    """Turn ``Constant`` nodes of the top-level graph into initializers; return how many.

    A ``Constant`` node and an initializer are the same value to every runtime, so this is
    lossless; it lets weight passes see weights that exporters store as nodes.
    """
    existing = {t.name for t in graph.initializer}
    keep: list[onnx.NodeProto] = []
    lifted = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            tensor = _constant_value(node)
            if tensor is not None and node.output[0] not in existing:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                existing.add(tensor.name)
                lifted += 1
                continue
        keep.append(node)
    if lifted:
        del graph.node[:]
        graph.node.extend(keep)
    return lifted


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        t = TensorProto()
        t.CopyFrom(attr.t)
        return t
    scalar_kinds = {
        "value_float": (np.float32, lambda a: a.f),
        "value_int": (np.int64, lambda a: a.i),
        "value_floats": (np.float32, lambda a: list(a.floats)),
        "value_ints": (np.int64, lambda a: list(a.ints)),
    }
    if attr.name in scalar_kinds:
        dtype, get = scalar_kinds[attr.name]
        return numpy_helper.from_array(np.asarray(get(attr), dtype=dtype))
    return None  # sparse or string constants stay nodes


def drop_initializer_inputs(graph: onnx.GraphProto) -> int:
    """Remove graph inputs that are also initializers (IR < 4 style); return how many.

    Such inputs let a caller override weights at run time, which stops constant folding and
    quantization from treating them as weights. Every exporter in use today means them as
    constants.
    """
    names = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in names]
    dropped = len(graph.input) - len(keep)
    if dropped:
        del graph.input[:]
        graph.input.extend(keep)
    return dropped


# --------------------------------------------------------------------------- saving


def weights_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto (inline raw or typed fields)."""
    total = 0
    for t, _ in iter_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            total += expected_nbytes(t) or 0
    return total


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sweep_stale_temporaries(folder: Path, stem: str) -> None:
    """Remove temporaries of earlier saves to the same target whose process is gone."""
    pattern = re.compile(re.escape(f".{stem}") + r"\..*" + re.escape(_TMP_MARK) + r"-(\d+)-")
    for entry in folder.iterdir():
        m = pattern.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                entry.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_temp(folder: Path, stem: str, suffix: str, chunks: Iterator[bytes] | list[bytes]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{_TMP_MARK}-{os.getpid()}-{suffix}", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            written = 0
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            if os.fstat(fh.fileno()).st_size != written:
                raise OSError(f"short write ({os.fstat(fh.fileno()).st_size} of {written} bytes)")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_path(path: str | os.PathLike[str], *, input_path: str | os.PathLike[str] | None = None) -> Path:
    """Check that ``path`` may be written as an output (before doing expensive work).

    Raises:
        ModelSaveError: missing folder, a symbolic link or non-file at the path, or the input.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError("output folder does not exist", path=path)
    if os.path.lexists(path):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise ModelSaveError("output path is a symbolic link; refusing to follow it", path=path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelSaveError("output path exists and is not a regular file", path=path)
        if input_path is not None and _same_file(path, Path(input_path)):
            raise ModelSaveError("output would overwrite the input model; choose another -o path", path=path)
    # Root writes through permission bits, and read-only mounts only show when writing: try.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{_TMP_MARK}-{os.getpid()}-probe", dir=folder)
    except OSError as exc:
        raise ModelSaveError(f"cannot write: {exc.strerror or exc}", path=path) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path written.

    Args:
        model: the model; it is not modified (tensors moved to external data are put back).
        path: the output ``.onnx`` file. Must not be the input model, nor a symbolic link.
        input_path: the model this one was made from, guarded against being overwritten.
        external_data: keep weights in a data file beside the model. ``None`` decides by
            size (weights over ~1.8 GB cannot live inside a protobuf).

    Raises:
        ModelSaveError: nothing was written and any previous output is intact.
    """
    path = check_output_path(path, input_path=input_path)
    folder = path.parent
    if has_external_data(model):
        raise ModelSaveError("model still references external data; load its weights first", path=path)
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD

    with _folder_lock(folder):
        _sweep_stale_temporaries(folder, path.name)
        data_name = _write_pair(model, path, external_data)
        # The pair is switched; every other data file of this output is now unreferenced
        # (the previous output's, or one left by a save killed between its two renames).
        _sweep_data_files(folder, path.name, keep=data_name)
    return path


def _write_pair(model: onnx.ModelProto, path: Path, external_data: bool) -> str | None:
    """Write the data file (if any) and the model through temporaries; switch them in place.

    Order: both temporaries complete and synced, then the data file is renamed to its final,
    content-addressed name (nothing references it yet), then the model is renamed over the
    output: the single step that switches from the previous pair to the new one.
    """
    folder = path.parent
    temporaries: list[Path] = []
    try:
        data_name = None
        if external_data:
            data_name, data_tmp, moved = _write_external(model, folder, path.name)
            temporaries.append(data_tmp)
            try:
                blob = model.SerializeToString()
            finally:
                _restore_inline(moved)
        else:
            blob = model.SerializeToString()
        if len(blob) > PROTOBUF_LIMIT:
            raise ModelSaveError("model is over 2 GiB even with external data", path=path)
        model_tmp = _write_temp(folder, path.name, "model", [blob])
        temporaries.append(model_tmp)
        if data_name is not None:
            os.replace(temporaries[0], folder / data_name)
        os.replace(model_tmp, path)
        temporaries.clear()
        _fsync_dir(folder)
    except ModelSaveError:
        raise
    except OSError as exc:
        raise ModelSaveError(f"cannot write: {exc.strerror or exc}", path=path) from None
    finally:
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return data_name


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise saves into one folder (an advisory lock on the folder itself: no lock file)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _data_file_name(model_name: str, digest: str) -> str:
    return f"{model_name}.{digest[:16]}.data"


def _sweep_data_files(folder: Path, model_name: str, *, keep: str | None) -> None:
    """Remove this output's data files (``<name>.<16 hex>.data``, a name only we write) but ``keep``."""
    pattern = re.compile(re.escape(model_name) + r"\.[0-9a-f]{16}\.data$")
    for entry in folder.iterdir():
        if entry.name != keep and pattern.match(entry.name):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(entry).st_mode):
                    entry.unlink()


_ALIGN = 4096


_Moved = list[tuple[TensorProto, bytes]]


def _write_external(model: onnx.ModelProto, folder: Path, model_name: str) -> tuple[str, Path, _Moved]:
    """Move large tensors' bytes to a temporary data file.

    Returns the data file's final name, the temporary path, and what was moved: the tensors
    are left pointing at the final name until ``_restore_inline`` puts their bytes back.
    """
    big = [t for t, _ in iter_tensors(model) if t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES]
    # Tensors with typed fields are converted to raw first so they can move out too.
    for t, _ in iter_tensors(model):
        if not t.HasField("raw_data") and t.data_type != TensorProto.STRING and (expected_nbytes(t) or 0) >= EXTERNAL_TENSOR_MIN_BYTES:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            big.append(t)
    digest = hashlib.sha256()
    layout: list[tuple[TensorProto, int]] = []
    offset = 0
    for t in big:
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        layout.append((t, offset))
        offset += len(t.raw_data)

    def chunks() -> Iterator[bytes]:
        pos = 0
        for t, off in layout:
            if off > pos:
                yield b"\0" * (off - pos)
            data = t.raw_data
            digest.update(data)
            yield data
            pos = off + len(data)

    tmp = _write_temp(folder, model_name, "data", chunks())
    name = _data_file_name(model_name, digest.hexdigest())
    moved = [(t, t.raw_data) for t, _ in layout]
    for t, off in layout:
        length = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", name), ("offset", str(off)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return name, tmp, moved


def _restore_inline(moved: _Moved) -> None:
    for t, data in moved:
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = data


# --------------------------------------------------------------------------- runtime handoff


@contextlib.contextmanager
def ort_model_source(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """Yield what ``onnxruntime.InferenceSession`` should be given for ``model``.

    Bytes when the model fits in a protobuf; otherwise a temporary folder holding the model
    with external data (removed afterwards).
    """
    if weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxshrink-") as tmp:
        target = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        yield str(target)
