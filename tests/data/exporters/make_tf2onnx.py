#!/usr/bin/env python
"""Regenerate the tf2onnx fixture in ``tests/data/exporters/`` (not run in CI).

Needs TensorFlow and tf2onnx, which are not onnxshrink dependencies; use a separate venv::

    python -m venv /work/tfvenv
    /work/tfvenv/bin/pip install "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*"
    /work/tfvenv/bin/python tests/data/exporters/make_tf2onnx.py

Writes

* ``tf2onnx_keras.onnx`` - a small untrained (seeded) Keras CNN in NHWC, converted by
  tf2onnx at opset 15: Conv(no bias)-BatchNorm-ReLU, depthwise Conv, 1x1 Conv-ReLU,
  MaxPool, strided Conv-ReLU, global average pool, Dense. tf2onnx keeps the NHWC input and
  wraps the convolutions in Transpose nodes; the batch dimension is dynamic.
* ``tf2onnx_keras_io.npz`` - a fixed input (batch 4) under the model's input name and
  Keras's own output under ``expected``.

The BatchNorm statistics are set away from their defaults so that a wrong fold would show.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

OUT = Path(__file__).resolve().parent
SEED = 1234
OPSET = 15
INPUT = "image"


def make_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(SEED)
    layers = tf.keras.layers
    inputs = tf.keras.Input((16, 16, 3), name=INPUT)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw2")(x)
    x = layers.Conv2D(16, 1, activation="relu", name="pw2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, name="logits")(x)
    model = tf.keras.Model(inputs, outputs, name="tiny_keras_cnn")
    rng = np.random.default_rng(SEED)
    bn = model.get_layer("bn1")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([
        rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
        rng.uniform(-0.2, 0.2, beta.shape).astype(np.float32),
        rng.uniform(-0.5, 0.5, mean.shape).astype(np.float32),
        rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
    ])  # fmt: skip
    return model


def main() -> int:
    model = make_model()
    x = np.random.default_rng(SEED).standard_normal((4, 16, 16, 3)).astype(np.float32)
    expected = model(x, training=False).numpy()

    @tf.function(input_signature=[tf.TensorSpec((None, 16, 16, 3), tf.float32, name=INPUT)])
    def forward(image: tf.Tensor) -> tf.Tensor:
        return model(image, training=False)

    path = OUT / "tf2onnx_keras.onnx"
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=forward.input_signature, opset=OPSET, output_path=str(path))
    input_name = proto.graph.input[0].name
    np.savez(OUT / "tf2onnx_keras_io.npz", **{input_name: x, "expected": expected})
    print(f"{path.name}: {path.stat().st_size} bytes, opset {OPSET}, input {input_name!r} {x.shape}, "
          f"{model.count_params()} params, tf {tf.__version__}, tf2onnx {tf2onnx.__version__}")
    try:
        import onnxruntime as ort
    except ImportError:
        return 0
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {input_name: x})[0]
    diff = float(np.abs(got - expected).max())
    print(f"max |onnxruntime - keras| = {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
