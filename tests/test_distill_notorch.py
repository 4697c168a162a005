"""Without torch: onnxshrink imports, and distillation fails with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from onnxshrink.testing import conv_net

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"
MESSAGE = "distillation needs PyTorch, which is not installed: pip install 'onnxshrink[train]'"


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120, check=False
    )


def test_onnxshrink_imports_without_torch() -> None:
    proc = run(
        "import onnxshrink, onnxshrink.cli, onnxshrink.cli.distill_cmd\n"
        "assert not [m for m, v in sys.modules.items() if m.startswith('torch') and v is not None]\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_distill_without_torch_is_a_one_line_error(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_net(channels=(3, 4), size=8).SerializeToString())
    argv = [
        "distill",
        "--teacher",
        str(model),
        "--student",
        str(model),
        "--data",
        "random",
        "-o",
        str(tmp_path / "o.onnx"),
    ]
    proc = run(
        "from onnxshrink.cli import cli, main\n"
        "from onnxshrink.cli.distill_cmd import distill\n"
        "cli.commands.setdefault('distill', distill)\n"
        f"sys.exit(main({argv!r}))\n"
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"onnxshrink: error: {MESSAGE}"]


def test_importing_distill_without_torch_raises_a_shrink_error() -> None:
    proc = run(
        "from onnxshrink.errors import ShrinkError\n"
        "try:\n"
        "    import onnxshrink.distill\n"
        "except ShrinkError as exc:\n"
        "    print(exc.one_line())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MESSAGE
