"""Input data for calibration, evaluation and distillation, streamed one sample at a time.

Accepted sources (``--calib``, ``--data``):

* a ``.npz`` file: keys are the model's input names (plus an optional ``labels``), the first
  axis indexes samples. Arrays are read sample by sample straight from the zip member, so
  memory does not grow with the number of samples, compressed files included;
* a folder of ``.npz`` files, one feed each (arrays as the model takes them, batch axis
  included), so inputs of varying shape work;
* a folder of images (``.png``, ``.jpg``, ...), flat or with one sub-folder per class (which
  gives labels), decoded with Pillow and preprocessed by an explicit :class:`ImagePreprocess`;
* ``random``: seeded standard-normal inputs, only when asked for explicitly.

Every sample is checked for non-finite values and for fitting the model's declared inputs.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import onnx

from onnxshrink.errors import DataError
from onnxshrink.stats import graph_inputs, value_signature

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_ONNX_TO_NUMPY = {
    "float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
    "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One feed for the model, and its label when the data set has one."""

    feeds: dict[str, np.ndarray]
    label: int | np.ndarray | None = None  # an array when a feed holds a batch


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | str | None] | None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for value in graph_inputs(model):
        sig = value_signature(value)
        specs.append(InputSpec(sig.name, np.dtype(_ONNX_TO_NUMPY.get(sig.dtype, np.float32)), sig.shape))
    return specs


@dataclass
class ImagePreprocess:
    """How to turn an image file into a model input (all explicit: no guessing).

    Attributes:
        size: (height, width) after resizing; ``None`` takes it from the model's input shape.
        layout: ``NCHW`` or ``NHWC``.
        mean, std: per-channel, applied after ``scale``.
        scale: multiplies the 0-255 pixel values first (1/255 maps to [0, 1]).
        mode: ``RGB``, ``BGR`` or ``L`` (grayscale).
    """

    size: tuple[int, int] | None = None
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    mode: str = "RGB"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"image layout must be NCHW or NHWC, not {self.layout!r}")
        if self.mode not in ("RGB", "BGR", "L"):
            raise DataError(f"image mode must be RGB, BGR or L, not {self.mode!r}")
        if any(s == 0 for s in self.std):
            raise DataError("image std must not contain 0")


class Dataset:
    """A finite, re-iterable stream of :class:`Sample`."""

    source: str
    has_labels: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        raise NotImplementedError

    def take(self, count: int, *, skip: int = 0) -> list[Sample]:
        """The samples ``skip .. skip+count`` (materialised; keep ``count`` small)."""
        out = []
        for i, sample in enumerate(self):
            if i >= skip + count:
                break
            if i >= skip:
                out.append(sample)
        return out


# --------------------------------------------------------------------------- npz


def _npy_member(zf: zipfile.ZipFile, key: str) -> tuple[IO[bytes], tuple[int, ...], np.dtype]:
    """Open ``key.npy`` inside an npz and read its header; the stream is left at the data.

    The header is untrusted: the shape it declares must fit in the member's stored size.
    """
    info = zf.getinfo(f"{key}.npy")
    stream = zf.open(info)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported npy version {version}")
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered arrays are not supported; save with np.ascontiguousarray")
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    if any(d < 0 for d in shape):
        raise ValueError(f"array '{key}' declares a negative dimension {list(shape)}")
    count = 1
    for d in shape:
        count *= int(d)
    if count * dtype.itemsize > info.file_size:
        stream.close()
        raise ValueError(
            f"array '{key}' declares shape {list(shape)} ({count * dtype.itemsize} bytes) but its member "
            f"holds {info.file_size} bytes (truncated or forged header)"
        )
    return stream, tuple(shape), dtype


class NpzDataset(Dataset):
    """Samples along the first axis of the arrays in one ``.npz`` file, streamed."""

    def __init__(self, path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.specs = list(specs)
        try:
            with zipfile.ZipFile(self.path) as zf:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                headers = {}
                for key in keys:
                    stream, shape, dtype = _npy_member(zf, key)
                    stream.close()
                    headers[key] = (shape, dtype)
        except KeyError as exc:
            raise DataError(f"not a readable .npz file (no member {exc})", path=self.path) from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            raise DataError(f"not a readable .npz file ({' '.join(str(exc).split())})", path=self.path) from None
        names = [s.name for s in self.specs]
        missing = [n for n in names if n not in headers]
        if missing:
            raise DataError(
                f"has no array for model input(s) {missing}; keys are {sorted(headers)} "
                "(use the model's input names as keys)",
                path=self.path,
            )
        extra = sorted(set(headers) - set(names) - {LABELS_KEY})
        if extra:
            log.warning("%s: ignoring arrays that are not model inputs: %s", self.path, extra)
        counts = {headers[n][0][0] if headers[n][0] else -1 for n in names}
        if len(counts) != 1 or -1 in counts:
            raise DataError("input arrays must share a first (sample) axis of the same length", path=self.path)
        self.count = counts.pop()
        if self.count == 0:
            raise DataError("holds no samples", path=self.path)
        self.has_labels = LABELS_KEY in headers
        if self.has_labels and headers[LABELS_KEY][0][:1] != (self.count,):
            raise DataError(f"'{LABELS_KEY}' must have one entry per sample ({self.count})", path=self.path)
        self.headers = headers
        # A model exported with a fixed batch B takes B samples per feed.
        batches = {s.shape[0] for s in self.specs if s.shape and isinstance(s.shape[0], int)}
        if len(batches) > 1:
            raise DataError(f"the model's inputs have different fixed batch sizes {sorted(batches)}", path=self.path)
        self.batch = batches.pop() if batches else 1
        if self.count < self.batch:
            raise DataError(f"holds {self.count} samples, fewer than the model's fixed batch of {self.batch}", path=self.path)
        for spec in self.specs:
            shape, _ = headers[spec.name]
            _check_shape(spec, (self.batch, *shape[1:]), self.path)

    def __len__(self) -> int:
        """Feeds (of ``batch`` samples each; a remainder smaller than the batch is dropped)."""
        return self.count // self.batch

    def __iter__(self) -> Iterator[Sample]:
        keys = [s.name for s in self.specs] + ([LABELS_KEY] if self.has_labels else [])
        with zipfile.ZipFile(self.path) as zf:
            streams = {k: _npy_member(zf, k) for k in keys}
            try:
                for i in range(len(self)):
                    arrays = {}
                    for key, (stream, shape, dtype) in streams.items():
                        nbytes = self.batch * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                        raw = stream.read(nbytes)
                        if len(raw) != nbytes:
                            raise DataError(f"array '{key}' is truncated at sample {i * self.batch}", path=self.path)
                        arrays[key] = np.frombuffer(raw, dtype=dtype).reshape((self.batch, *shape[1:]))
                    label = _label(arrays.pop(LABELS_KEY)) if self.has_labels else None
                    feeds = {s.name: _cast(arrays[s.name], s, self.path) for s in self.specs}
                    yield Sample(feeds, label)
            finally:
                for stream, _, _ in streams.values():
                    stream.close()


class NpzFolderDataset(Dataset):
    """One feed per ``.npz`` file in a folder (sorted by name)."""

    def __init__(self, folder: str | os.PathLike[str], specs: Sequence[InputSpec]) -> None:
        self.folder = Path(folder)
        self.source = str(folder)
        self.specs = list(specs)
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix == ".npz" and p.is_file())
        if not self.files:
            raise DataError("folder holds no .npz files", path=self.folder)
        with np.load(self.files[0], allow_pickle=False) as first:
            self.has_labels = LABELS_KEY in first.files

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"not a readable .npz file ({exc})", path=path) from None
            missing = [s.name for s in self.specs if s.name not in arrays]
            if missing:
                raise DataError(f"has no array for model input(s) {missing}", path=path)
            feeds = {}
            for spec in self.specs:
                _check_shape(spec, arrays[spec.name].shape, path)
                feeds[spec.name] = _cast(arrays[spec.name], spec, path)
            label = _label(arrays[LABELS_KEY]) if LABELS_KEY in arrays else None
            yield Sample(feeds, label)


# --------------------------------------------------------------------------- images


class ImageFolderDataset(Dataset):
    """Images from a folder; sub-folders are classes (sorted names give label indices)."""

    def __init__(self, folder: str | os.PathLike[str], specs: Sequence[InputSpec], preprocess: ImagePreprocess) -> None:
        if len(specs) != 1:
            raise DataError("an image folder can only feed a model with exactly one input", path=folder)
        self.folder = Path(folder)
        self.source = str(folder)
        self.spec = specs[0]
        self.preprocess = preprocess
        classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        items: list[tuple[Path, int | None]] = []
        if classes:
            for index, name in enumerate(classes):
                items += [(p, index) for p in sorted((self.folder / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            self.has_labels = True
        else:
            items = [(p, None) for p in sorted(self.folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise DataError("folder holds no images", path=self.folder)
        self.classes = classes
        self.items = items
        self.size = preprocess.size or _spatial_size(self.spec, preprocess.layout)
        if self.size is None:
            raise DataError("the model's input has no fixed height/width; give the image size explicitly", path=folder)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow is a core dependency
            raise DataError("reading images needs Pillow: pip install pillow") from None
        p = self.preprocess
        for path, label in self.items:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if p.mode == "L" else "RGB")
                    img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
                    pixels = np.asarray(img, dtype=np.float32)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read image ({exc})", path=path) from None
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
            if p.mode == "BGR":
                pixels = pixels[:, :, ::-1]
            x = (pixels * p.scale - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
            if p.layout == "NCHW":
                x = x.transpose(2, 0, 1)
            x = np.ascontiguousarray(x[None])
            _check_shape(self.spec, x.shape, path)
            yield Sample({self.spec.name: _cast(x, self.spec, path)}, label)


def _spatial_size(spec: InputSpec, layout: str) -> tuple[int, int] | None:
    if spec.shape is None or len(spec.shape) != 4:
        return None
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


# --------------------------------------------------------------------------- random


class RandomDataset(Dataset):
    """Seeded standard-normal inputs: accuracy measured on them means nothing."""

    def __init__(self, specs: Sequence[InputSpec], *, count: int = 32, seed: int = 0, shapes: dict[str, list[int]] | None = None) -> None:
        self.source = "random"
        self.specs = list(specs)
        self.count = count
        self.seed = seed
        self.shapes = {}
        for spec in self.specs:
            if shapes and spec.name in shapes:
                self.shapes[spec.name] = list(shapes[spec.name])
                continue
            if spec.shape is None:
                raise DataError(f"input '{spec.name}' has unknown rank; give --shape for random data")
            dims = [d if isinstance(d, int) else (1 if i == 0 else None) for i, d in enumerate(spec.shape)]
            if any(d is None for d in dims):
                raise DataError(f"input '{spec.name}' has dynamic dimensions {spec.shape}; give --shape for random data")
            self.shapes[spec.name] = [int(d) for d in dims if d is not None]
        _check_sample_size({n: (s, self._spec(n).dtype) for n, s in self.shapes.items()}, "random input")

    def _spec(self, name: str) -> InputSpec:
        return next(s for s in self.specs if s.name == name)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Sample]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.count):
            feeds = {}
            for spec in self.specs:
                shape = self.shapes[spec.name]
                if np.issubdtype(spec.dtype, np.floating):
                    feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                else:
                    feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
            yield Sample(feeds)


# --------------------------------------------------------------------------- helpers


def _check_sample_size(shapes: dict[str, tuple[list[int] | tuple[int, ...], np.dtype]], what: str, path: Path | str | None = None) -> None:
    """Refuse a sample that would not fit in the memory bound (a declared dim of 2**40)."""
    from onnxshrink.runtime import MAX_MEMORY_ENV, human_bytes, memory_bound

    bound = memory_bound()
    if bound is None:
        return
    for name, (shape, dtype) in shapes.items():
        count = 1
        for d in shape:
            count *= max(int(d), 0)
        if count * np.dtype(dtype).itemsize > bound:
            raise DataError(
                f"{what} '{name}' of shape {list(shape)} is too large: {human_bytes(count * np.dtype(dtype).itemsize)}, "
                f"over the memory bound of {human_bytes(bound)} ({MAX_MEMORY_ENV})",
                path=path,
            )


#: A calibration feed whose largest |value| is this many times the median feed's is an
#: outlier: the int8 range it sets alone would quantize every ordinary input to zero.
OUTLIER_RATIO = 1000.0


class OutlierWatch:
    """Per-feed peaks of the float inputs, taken as samples stream by (no extra pass).

    Degenerate calibration, decided: a constant input (zero range) is fine, the quantizer
    gives it scale 1; one sample is accepted with a warning about held-back fidelity; a feed
    that dwarfs the others (:data:`OUTLIER_RATIO`) is refused by :meth:`check`.
    """

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self.peaks: dict[str, list[float]] = {}

    def watch(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for sample in samples:
            for name, array in sample.feeds.items():
                if np.issubdtype(array.dtype, np.floating):
                    self.peaks.setdefault(name, []).append(float(np.max(np.abs(array))) if array.size else 0.0)
            yield sample

    def check(self) -> None:
        for name, peaks in self.peaks.items():
            if len(peaks) < 3:
                continue
            median, top = float(np.median(peaks)), max(peaks)
            if median > 0 and top > OUTLIER_RATIO * median:
                raise DataError(
                    f"calibration data for input '{name}' is dominated by an outlier: sample {peaks.index(top)} "
                    f"reaches |x| = {top:.3g}, {top / median:.3g} times the median sample's {median:.3g}; int8 "
                    "ranges set by it would quantize every ordinary input to zero (remove or fix that sample)",
                    path=self.source if self.source != "random" else None,
                )


def _label(values: np.ndarray) -> int | np.ndarray:
    """One int for a one-sample feed, the array of labels for a batch."""
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    return int(flat[0]) if flat.size == 1 else flat


def _check_shape(spec: InputSpec, shape: tuple[int, ...], path: Path | str) -> None:
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise DataError(
            f"array for input '{spec.name}' has rank {len(shape)} {list(shape)}, the model expects "
            f"rank {len(spec.shape)} {spec.shape}",
            path=path,
        )
    for want, got in zip(spec.shape, shape):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"array for input '{spec.name}' has shape {list(shape)}, the model expects {spec.shape}",
                path=path,
            )


def _cast(array: np.ndarray, spec: InputSpec, path: Path | str) -> np.ndarray:
    if array.dtype != spec.dtype:
        same_kind = np.issubdtype(spec.dtype, np.floating) == np.issubdtype(array.dtype, np.floating)
        if not same_kind:
            raise DataError(f"array for input '{spec.name}' is {array.dtype}, model expects {spec.dtype}", path=path)
        array = array.astype(spec.dtype)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise DataError(f"array for input '{spec.name}' contains NaN or infinite values", path=path)
    return array


@dataclass
class DataOptions:
    """How to interpret a data source given on the command line."""

    preprocess: ImagePreprocess = field(default_factory=ImagePreprocess)
    random_count: int = 32
    seed: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)


def open_dataset(source: str | os.PathLike[str], model: onnx.ModelProto, options: DataOptions | None = None) -> Dataset:
    """Open ``source`` (npz file, npz folder, image folder or ``random``) for ``model``."""
    options = options or DataOptions()
    specs = model_input_specs(model)
    if str(source) == "random":
        dataset = RandomDataset(specs, count=options.random_count, seed=options.seed, shapes=options.shapes)
        log.warning(
            "using random inputs: calibration will be poor and accuracy figures are meaningless; "
            "give real samples for a model you will deploy"
        )
        return dataset
    path = Path(source)
    if not path.exists():
        raise DataError("data not found (expected a .npz file, a folder, or 'random')", path=path)
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError("data file must be a .npz archive", path=path)
        return NpzDataset(path, specs)
    if path.is_dir():
        entries = list(path.iterdir())
        if any(p.suffix == ".npz" for p in entries):
            return NpzFolderDataset(path, specs)
        return ImageFolderDataset(path, specs, options.preprocess)
    raise DataError("data must be a regular file or a folder", path=path)
