"""Data sources: npz streamed sample by sample, folders of npz, image folders, random."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.data import DataOptions, ImagePreprocess, NpzDataset, open_dataset
from onnxshrink.errors import DataError
from onnxshrink.testing import conv_net


@pytest.fixture
def model():
    return conv_net(channels=(3, 4), size=8)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_the_same_samples_as_numpy(tmp_path, model, compressed):
    x = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
    labels = np.arange(7, dtype=np.int64)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", input=x, labels=labels)
    ds = open_dataset(tmp_path / "d.npz", model)
    assert isinstance(ds, NpzDataset) and len(ds) == 7 and ds.has_labels
    samples = list(ds)
    np.testing.assert_array_equal(np.concatenate([s.feeds["input"] for s in samples]), x)
    assert [s.label for s in samples] == list(range(7))
    assert [s.label for s in ds.take(2, skip=3)] == [3, 4]


def test_npz_dtype_is_cast_and_shape_checked(tmp_path, model):
    np.savez(tmp_path / "f64.npz", input=np.zeros((2, 3, 8, 8), np.float64))
    assert next(iter(open_dataset(tmp_path / "f64.npz", model))).feeds["input"].dtype == np.float32
    np.savez(tmp_path / "bad.npz", input=np.zeros((2, 3, 9, 8), np.float32))
    with pytest.raises(DataError, match="has shape"):
        open_dataset(tmp_path / "bad.npz", model)


def test_folder_of_npz_with_varying_batch(tmp_path, model):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, batch in enumerate((1, 3, 2)):
        np.savez(folder / f"{i:03d}.npz", input=np.full((batch, 3, 8, 8), i, np.float32))
    ds = open_dataset(folder, model)
    assert [s.feeds["input"].shape[0] for s in ds] == [1, 3, 2]


def test_image_folder_with_classes_and_preprocessing(tmp_path, model):
    from PIL import Image

    for label, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        d = tmp_path / "images" / f"class_{label}"
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (20, 12), colour).save(d / f"{k}.png")
    options = DataOptions(preprocess=ImagePreprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    ds = open_dataset(tmp_path / "images", model, options)
    samples = list(ds)
    assert len(samples) == 4 and [s.label for s in samples] == [0, 0, 1, 1]
    x = samples[0].feeds["input"]
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)  # red, NCHW, (x/255-0.5)/0.5
    np.testing.assert_allclose(samples[2].feeds["input"][0, :, 0, 0], [-1.0, -1.0, 1.0], atol=1e-6)


def test_random_needs_to_be_asked_for_and_warns(model, caplog):
    ds = open_dataset("random", model, DataOptions(random_count=3))
    assert len(ds) == 3 and "random inputs" in caplog.text


@pytest.mark.parametrize("payload, message", [(b"not a zip", "not a readable .npz"), (None, "not found")])
def test_bad_data_files(tmp_path, model, payload, message):
    path = tmp_path / "d.npz"
    if payload is not None:
        path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        open_dataset(path, model)


def test_object_arrays_are_refused(tmp_path, model):
    np.savez(tmp_path / "o.npz", input=np.array([object()] * 2, dtype=object))
    with pytest.raises(DataError):
        open_dataset(tmp_path / "o.npz", model)


def test_fixed_batch_models_get_feeds_of_that_batch(tmp_path):
    model = conv_net(channels=(3, 4), size=8, batch=4)
    x = np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", input=x, labels=np.arange(10))
    ds = open_dataset(tmp_path / "d.npz", model)
    samples = list(ds)
    assert len(ds) == len(samples) == 2  # the remainder of 2 samples is dropped
    np.testing.assert_array_equal(samples[1].feeds["input"], x[4:8])
    np.testing.assert_array_equal(samples[1].label, [4, 5, 6, 7])
    np.savez(tmp_path / "few.npz", input=x[:3])
    with pytest.raises(DataError, match="fewer than the model's fixed batch of 4"):
        open_dataset(tmp_path / "few.npz", model)


def test_fixed_batch_model_quantizes_with_labels(tmp_path):
    from onnxshrink.quantize import Int8Config, quantize_int8

    model = conv_net(channels=(3, 8), size=8, batch=2)
    x = np.random.default_rng(2).standard_normal((120, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.zeros(120, np.int64))
    result = quantize_int8(model, open_dataset(tmp_path / "d.npz", model), Int8Config(max_drop=100.0))
    assert result.fidelity.samples == result.evaluation_samples and result.fidelity.accuracy_reference is not None
