from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxshrink.testing import conv_net

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"
CANARY = b"CANARY-7f3a9c-DO-NOT-LEAK"


@pytest.fixture
def small_model() -> onnx.ModelProto:
    return conv_net(channels=(3, 8, 16), size=12, seed=1)


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)}


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A secret file outside every model folder; its bytes must never show up anywhere."""
    secret_dir = tmp_path / "outside"
    secret_dir.mkdir()
    path = secret_dir / "secret.bin"
    path.write_bytes(CANARY * 64)
    return path


def make_external(tensor: TensorProto, location: str, *, offset: int = 0, length: int | None = None) -> None:
    """Point ``tensor`` at external data, dropping its inline bytes."""
    nbytes = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes if length is None else length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def tree_bytes(folder: Path) -> bytes:
    """Every byte of every regular file under ``folder`` (to look for leaked canaries)."""
    out = b""
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                out += p.read_bytes()
    return out
