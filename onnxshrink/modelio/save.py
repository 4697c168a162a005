"""Atomic saving (temporary files ``os.replace``-d into place, external data named by a hash
of its bytes), and handing a model in memory to onnxruntime."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from onnxshrink.errors import ModelSaveError
from onnxshrink.modelio.tensors import (
    EXTERNAL_DATA_THRESHOLD,
    EXTERNAL_TENSOR_MIN_BYTES,
    PROTOBUF_LIMIT,
    expected_nbytes,
    has_external_data,
    iter_tensors,
    weights_nbytes,
)


_TMP_MARK = ".onnxshrink-tmp"


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
