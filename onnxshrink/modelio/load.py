"""Loading an untrusted model file: every check made before onnx or onnxruntime sees a byte
(see :mod:`onnxshrink.modelio`), and the clean-ups made on load."""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, numpy_helper

from onnxshrink.errors import (
    ModelLoadError,
    UnsafeModelError,
    UnsupportedModelError,
)
from onnxshrink.modelio.tensors import (
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
    typed_field_count,
)
from onnxshrink.operands import check_required_inputs


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
    stored, want = typed_field_count(tensor)
    if stored != want:
        raise UnsafeModelError(
            f"{where} declares shape {list(tensor.dims)} ({want} values) but stores {stored}",
            path=path,
        )


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
