"""A short run of the fuzz target (fuzz/fuzz_load_shrink.py) and a replay of its crash inputs.

The long run is documented in fuzz/README.md. Skipped when atheris is not installed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris; it is in the test extra)")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_load_shrink as target  # noqa: E402
import make_seeds  # noqa: E402

REPRODUCERS = sorted((FUZZ / "crashes").glob("*.onnx"))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    # No node-test seeds here: generating them takes ~7 s; the long run uses 200.
    assert make_seeds.write_seeds(folder, max_bytes=16384, node_tests=0) >= 40
    return folder


def test_known_crash_list_is_well_formed():
    known = target.load_known()
    for sig, entry in known.items():
        assert sig.split(" in ")[0].endswith(("Error", "Exception")), sig
        assert (FUZZ / entry["reproducer"]).is_file(), entry["reproducer"]


@pytest.mark.parametrize("path", REPRODUCERS, ids=[p.stem for p in REPRODUCERS])
def test_crash_reproducers_crash_no_more_or_are_reported(path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fixed crash stays fixed; an open one must be listed in fuzz/known_crashes.json."""
    known = target.load_known()
    monkeypatch.setattr(target, "STRICT", True)  # raise known crashes too, to see what they are
    target._quiet()
    try:
        target.run_one(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - run_one already lets ShrinkError pass
        assert target.signature(exc) in known, f"new crash: {target.signature(exc)}"
        return
    finally:
        import logging

        logging.disable(logging.NOTSET)
        warnings.resetwarnings()
    listed = [s for s, e in known.items() if Path(e["reproducer"]).name == path.name]
    if listed:
        warnings.warn(f"{path.name} no longer crashes: remove '{listed[0]}' from fuzz/known_crashes.json", stacklevel=1)


HANGS = sorted((FUZZ / "crashes" / "hangs").glob("timeout-*.onnx"))


@pytest.mark.parametrize("path", HANGS, ids=[p.stem for p in HANGS])
def test_hang_reproducers_now_finish(path: Path, tmp_path: Path):
    """Inputs that once hung (fixed since) must finish well within the fuzzer's 60 s timeout."""
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", ONNXSHRINK_FUZZ_STRICT="1")
    argv = [sys.executable, str(FUZZ / "fuzz_load_shrink.py"), "--repro", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "no crash" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]


def test_structure_aware_mutator_changes_models_and_keeps_most_parseable(seeds: Path):
    rng = random.Random(0)
    blobs = [p.read_bytes() for p in sorted(seeds.iterdir())[:30]]
    changed = parsed = 0
    for blob in blobs:
        for _ in range(5):
            out = target.mutate_model(blob, rng)
            assert out is not None  # every seed is a model
            changed += out != blob
            try:
                onnx.ModelProto.FromString(out)
                parsed += 1
            except Exception:  # noqa: BLE001
                pass
    assert changed >= 0.8 * 5 * len(blobs)
    assert parsed == 5 * len(blobs)
    assert target.mutate_model(b"\xff\x00 not a model", rng) is None
    for path in REPRODUCERS:  # hostile inputs (invalid UTF-8 names...) must not crash the mutator
        for _ in range(20):
            target.mutate_model(path.read_bytes(), rng)


def test_smoke_run_finds_no_crash_or_hang(seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """300 executions of coverage-guided fuzzing from the seed corpus (~20 s; fixed seed).

    Bounded by the number of runs, not by time, so a loaded CI machine runs the same inputs;
    ``-max_total_time`` is only a safety net.
    """
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    argv = [
        sys.executable, str(FUZZ / "fuzz_load_shrink.py"), str(corpus), str(seeds),
        "-seed=1", "-runs=300", "-max_total_time=150", "-timeout=30", "-rss_limit_mb=3072",
        "-max_len=131072", f"-artifact_prefix={tmp_path}/",
    ]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    artifacts = sorted(p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    found = []
    monkeypatch.setattr(target, "STRICT", True)
    for path in artifacts:  # name what was found, as fuzz/triage.py would
        try:
            target.run_one(path.read_bytes())
            found.append(f"{path.name}: does not reproduce in-process (timeout or memory?)")
        except Exception as exc:  # noqa: BLE001
            found.append(f"{path.name}: {target.signature(exc)}")
    assert proc.returncode == 0 and not artifacts, f"fuzz smoke run failed (rc {proc.returncode}): {found}\n{log[-2000:]}"
    assert "Done 300 runs" in log, log[-2000:]


def test_the_property_a_shrink_error_passes_anything_else_crashes(monkeypatch: pytest.MonkeyPatch):
    from onnxshrink.errors import ModelLoadError

    def refuse(*_args, **_kwargs):
        raise ModelLoadError("not a model")

    def crash(*_args, **_kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(target, "shrink", refuse)
    target.run_one(b"anything")  # a refusal is the right answer
    monkeypatch.setattr(target, "shrink", crash)
    with pytest.raises(KeyError):
        target.run_one(b"anything")
    # A reported, open crash is counted (not raised) unless strict.
    monkeypatch.setattr(target, "_KNOWN", {"KeyError in test_fuzz_smoke.py:crash": {}})
    monkeypatch.setattr(target, "STRICT", False)
    target.run_one(b"anything")
    assert target.known_hits["KeyError in test_fuzz_smoke.py:crash"] >= 1
    monkeypatch.setattr(target, "STRICT", True)
    with pytest.raises(KeyError):
        target.run_one(b"anything")
