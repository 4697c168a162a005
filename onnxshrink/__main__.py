from onnxshrink.cli import run

run()
