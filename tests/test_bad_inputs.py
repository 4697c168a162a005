"""Every case of the bad-input corpus, three times: one line, its exit code, nothing touched.

Per case and round: the documented exit code; exactly one line on stderr, starting
``onnxshrink: error:``, naming the file and containing the expected text; no traceback; done
within 30 s; every file under the scratch folder (inputs, canary) byte-for-byte unchanged and
no file created (no output, no temporary, nothing in the temp dir or the working directory);
the canary's bytes nowhere in stdout or stderr; no pickle ever unpickled.

Cases that run the model's own graph (a Loop that never ends, a giant allocation) run as a
subprocess with a hard address-space limit of its own, so that a regression in our bounds
fails the test instead of hurting the machine.
"""

from __future__ import annotations

import hashlib
import os
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import numpy as np
import onnx
from onnx import numpy_helper

from bad_inputs.corpus import CANARY, CASES, Case, Layout, argv, base_model, save
from onnxshrink.cli import main
from onnxshrink.testing import run_ort

ROUNDS = 3
DEADLINE_S = 30.0
# Bounds the commands run under here (the defaults are higher; see onnxshrink.runtime).
BOUNDS = {"ONNXSHRINK_MAX_RUN_SECONDS": "2", "ONNXSHRINK_MAX_MEMORY": "1G"}
SAFETY_AS_BYTES = 6 << 30  # the isolated child's own ceiling, far above our bound


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: its type, and for regular files the hash of the bytes."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                entries[str(path)] = "link->" + os.readlink(path)
            else:
                entries[str(path)] = oct(stat.S_IFMT(st.st_mode))
    return entries


def _run_isolated(args: list[str], cwd: Path, tmp: Path) -> tuple[int, str, str]:
    env = {**os.environ, **BOUNDS, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (SAFETY_AS_BYTES, SAFETY_AS_BYTES))

    proc = subprocess.run(
        [sys.executable, "-m", "onnxshrink", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        preexec_fn=limit,
        timeout=DEADLINE_S,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("round_", range(ROUNDS), ids=lambda r: f"r{r}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, round_: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    lay = Layout(tmp_path / "scratch")
    lay.create()
    built = case.build(lay)
    args = argv(case, built, lay)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    before = snapshot(lay.root)

    start = time.monotonic()
    if case.isolate:
        code, out, err = _run_isolated(args, cwd, tmp)
    else:
        for key, value in BOUNDS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("TMPDIR", str(tmp))
        monkeypatch.setattr("tempfile.tempdir", str(tmp))
        monkeypatch.chdir(cwd)
        code = main(args)
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    elapsed = time.monotonic() - start

    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case.name}: expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("onnxshrink: error: "), line
    assert "Traceback" not in err and "Traceback" not in out
    assert case.message in line, f"{case.name}: {line!r} lacks {case.message!r}"
    assert str(built.names or built.model) in line, f"{case.name}: {line!r} does not name the file"
    assert code == case.exit_code, f"{case.name}: exit {code}, expected {case.exit_code}: {line}"
    assert elapsed < DEADLINE_S
    assert CANARY not in out.encode() and CANARY not in err.encode()
    assert snapshot(lay.root) == before, "an input changed, or a file was written"
    assert not os.listdir(tmp) and not os.listdir(cwd), "temporary files were left behind"
    assert not lay.pickle_marker.exists(), "a pickle from the data was unpickled"


def test_corpus_covers_every_class() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {"not-a-model", "external-data", "graph", "numeric", "data", "output"}
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} >= {"inspect", "int8", "prune", "bench", "distill"}


@pytest.mark.parametrize(
    "name, samples",
    [
        ("constant-zero", np.zeros((24, 3, 8, 8), np.float32)),  # zero range: scale 1 by choice
        ("constant-seven", np.full((24, 3, 8, 8), 7.0, np.float32)),
        ("single-sample", np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)),
    ],
)
def test_degenerate_calibration_gives_valid_scales(name: str, samples: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Documented safe choices: the model is written, every scale finite and positive, outputs finite."""
    model_path = save(base_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", input=samples)
    out = tmp_path / "q.onnx"
    code = main(["shrink", str(model_path), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--no-timing"])
    err = capsys.readouterr().err
    assert code == 0, err
    quantized = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    scales = [inits[n.input[1]] for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    feeds = {"input": np.concatenate([samples[:1], np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)])}
    assert np.all(np.isfinite(run_ort(quantized, feeds)[0]))


@pytest.mark.timeout(30)
def test_run_bounds_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds as a library user meets them: one-line errors, the limit restored after."""
    from bad_inputs.corpus import _giant_constant_of_shape, _loop_model
    from onnxshrink.errors import ShrinkError
    from onnxshrink.runtime import make_session

    monkeypatch.setenv("ONNXSHRINK_MAX_RUN_SECONDS", "0.5")
    monkeypatch.setenv("ONNXSHRINK_MAX_MEMORY", "512M")
    limit_before = resource.getrlimit(resource.RLIMIT_AS)
    x = {"input": np.ones((1, 4), np.float32)}
    start = time.monotonic()
    with pytest.raises(ShrinkError, match="time bound of 0.5 s"):
        make_session(_loop_model()).run(None, x)
    assert time.monotonic() - start < 5
    with pytest.raises(ShrinkError, match="memory bound of 512 MiB"):
        make_session(_giant_constant_of_shape()).run(None, x)
    assert resource.getrlimit(resource.RLIMIT_AS) == limit_before
    # Ordinary work goes on in the same process, under the same bounds.
    model = base_model()
    out = make_session(model).run(None, {"input": np.ones((2, 3, 8, 8), np.float32)})
    assert out[0].shape == (2, 10) and np.all(np.isfinite(out[0]))
