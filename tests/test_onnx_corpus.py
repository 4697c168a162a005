"""A correctness corpus nobody here wrote: the test models that the ``onnx`` wheel carries.

Every case of ``onnx.backend.test.loader.load_model_tests`` for the kinds ``node`` (generated
in memory by the wheel), ``simple``, ``pytorch-converted`` and ``pytorch-operator`` (folders
of ``model.onnx`` + ``test_data_set_*/{input,output}_*.pb``) goes through

    our loader (``modelio.load_model``) -> the lossless preparation that quantization runs
    (``passes.prepare.prepare``) -> ``modelio.save_model`` -> onnxruntime -> the outputs the
    wheel expects (its own ``rtol``/``atol``: 1e-3 / 1e-7).

Each case ends in one of four outcomes:

* ``passed``;
* ``refused``: a one-line refusal that is our policy (opset below ``MIN_OPSET``, an already
  quantized model, non-finite weights), listed in the summary;
* ``ort``: onnxruntime itself cannot run the *original* model, or its own outputs differ
  from the expected ones; these are listed, with the first line of the reason, in
  ``onnx_corpus_known.json``. Where onnxruntime runs the original deterministically but
  disagrees with the wheel, the prepared model must still reproduce onnxruntime's outputs
  (else the case is ``failed``);
* ``failed``: anything else, including a preparation step that the prepare guard had to
  drop because it moved the outputs. This is a bug in onnxshrink.

The test fails on a ``failed`` case, on an ``ort`` case missing from the known list, and on
a known case that now runs (so the list stays honest). To rewrite the known list after an
onnx/onnxruntime upgrade: ``python tests/test_onnx_corpus.py --write-known``.

Speed: one process, sessions with one thread, models of a few KB, and the scratch folder on a
tmpfs where there is one (``save_model`` fsyncs each file; on disk that was two thirds of the
wall time). The save round trip is kept: it is part of what is tested.
"""

from __future__ import annotations

import glob
import json
import logging
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxshrink.data import Sample
from onnxshrink.errors import ShrinkError, UnsupportedModelError
from onnxshrink.modelio import MIN_OPSET, load_model, save_model
from onnxshrink.passes.prepare import prepare

KNOWN_FILE = Path(__file__).resolve().parent / "onnx_corpus_known.json"
FOLDER_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
#: Refusals that are policy, recognised by their message (one line each).
POLICY_MESSAGES = (
    f"is older than {MIN_OPSET}",  # modelio: convert it first
    "the model is already quantized",  # prepare: give the fp32 model
    "NaN or infinite value",  # prepare: non-finite weights break every scale
)


@dataclass
class Case:
    kind: str
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float
    atol: float

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class Outcome:
    status: str  # passed | refused | ort | failed
    reason: str = ""
    applied: tuple[str, ...] = ()  # the preparation steps that changed the model
    step_failures: tuple[str, ...] = ()  # "<step>: <reason>" of steps that raised and were skipped


# ----------------------------------------------------------------- reading the corpus


def _read_value(path: str, type_proto: onnx.TypeProto | None) -> Any:
    data = Path(path).read_bytes()
    kind = type_proto.WhichOneof("value") if type_proto is not None else "tensor_type"
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _folder_case(case: Any) -> Case:
    model = onnx.load(str(Path(case.model_dir) / "model.onnx"))
    in_types = [i.type for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    out_types = [o.type for o in model.graph.output]
    data_sets = []
    for folder in sorted(glob.glob(str(Path(case.model_dir) / "test_data_set_*"))):
        inputs = _read_values(f"{folder}/input_*.pb", in_types)
        outputs = _read_values(f"{folder}/output_*.pb", out_types)
        data_sets.append((inputs, outputs))
    return Case(case.kind, case.name, model, data_sets, case.rtol, case.atol)


def _read_values(pattern: str, types: list[onnx.TypeProto]) -> list[Any]:
    paths = sorted(glob.glob(pattern), key=_index)
    return [_read_value(p, types[i] if i < len(types) else None) for i, p in enumerate(paths)]


def _index(path: str) -> int:
    return int(Path(path).stem.rsplit("_", 1)[1])


def load_corpus() -> list[Case]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wheel's generators overflow on purpose
        cases = [Case("node", c.name, c.model, c.data_sets, c.rtol, c.atol) for c in load_model_tests(kind="node")]
    for kind in FOLDER_KINDS:
        cases += [_folder_case(c) for c in load_model_tests(kind=kind)]
    return sorted(cases, key=lambda c: c.key)


# ----------------------------------------------------------------- running one case


def _feed_value(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and _is_ml_dtype(value.dtype) and value.dtype.itemsize in (1, 2):
        # bfloat16 / float8 (ml_dtypes): onnxruntime takes their bits with the onnx type.
        bits = value.view(np.uint8 if value.dtype.itemsize == 1 else np.uint16)
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(bits), onnx_type)
    return value


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return type(dtype).__module__.startswith("ml_dtypes") or dtype.kind == "V"


def _feeds(model: onnx.ModelProto, inputs: list[Any]) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return {name: _feed_value(v) for name, v in zip(names, inputs)}


def _session(model: onnx.ModelProto | str) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return " ".join(line.split())[:240]


def compare(expected: Any, actual: Any, rtol: float, atol: float, where: str = "output") -> str | None:
    """None when ``actual`` matches ``expected`` as the onnx backend runner compares; else why."""
    if isinstance(expected, list) or isinstance(actual, list):
        if not isinstance(expected, list) or not isinstance(actual, list) or len(expected) != len(actual):
            return f"{where}: sequence mismatch"
        for i, (e, a) in enumerate(zip(expected, actual)):
            why = compare(e, a, rtol, atol, f"{where}[{i}]")
            if why:
                return why
        return None
    if expected is None or actual is None:
        return None if expected is None and actual is None else f"{where}: optional presence differs"
    if isinstance(expected, onnx.TensorProto):
        expected = numpy_helper.to_array(expected)
    expected, actual = np.asarray(expected), np.asarray(actual)
    if _is_ml_dtype(expected.dtype) and not _is_ml_dtype(actual.dtype) and actual.dtype.itemsize == expected.dtype.itemsize:
        actual = actual.view(expected.dtype)  # onnxruntime hands back bfloat16/float8 as their bits
    if _is_ml_dtype(expected.dtype):
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    if expected.shape != actual.shape:
        return f"{where}: shape {actual.shape} != expected {expected.shape}"
    if expected.dtype != actual.dtype and not (expected.dtype.kind == actual.dtype.kind == "f"):
        return f"{where}: dtype {actual.dtype} != expected {expected.dtype}"
    if expected.dtype.kind in "OUSb" or not np.issubdtype(expected.dtype, np.number):
        if expected.dtype.kind == "V" or expected.dtype.names is not None:
            return None if expected.tobytes() == actual.tobytes() else f"{where}: bytes differ"
        try:
            same = bool(np.array_equal(expected.astype(np.float64), actual.astype(np.float64), equal_nan=True))
        except (TypeError, ValueError):
            same = bool(np.array_equal(expected, actual))
        return None if same else f"{where}: values differ"
    e64, a64 = expected.astype(np.float64), actual.astype(np.float64)
    if not np.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True):
        err = np.abs(a64 - e64)
        worst = float(np.nanmax(err)) if err.size and not np.all(np.isnan(err)) else float("nan")
        return f"{where}: max abs error {worst:.3g} over rtol={rtol:g} atol={atol:g}"
    return None


def _run_all(session: Any, case: Case, model: onnx.ModelProto) -> list[list[Any]]:
    return [session.run(None, _feeds(model, inputs)) for inputs, _ in case.data_sets]


def _first_difference(expected_sets: list[list[Any]], actual_sets: list[list[Any]], case: Case) -> str | None:
    for expected, actual in zip(expected_sets, actual_sets):
        for i, (e, a) in enumerate(zip(expected, actual)):
            why = compare(e, a, case.rtol, case.atol, f"output {i}")
            if why:
                return why
    return None


def run_case(case: Case, scratch: Path) -> Outcome:
    """The case through load -> prepare -> save -> onnxruntime (see the module docstring)."""
    src = scratch / "in.onnx"
    src.write_bytes(case.model.SerializeToString())
    try:
        model, _ = load_model(src)
    except ShrinkError as exc:
        return _refusal(exc, "load")
    expected = [outputs for _, outputs in case.data_sets]
    try:  # can onnxruntime run the original at all, and does it agree with the wheel?
        original = _run_all(_session(case.model), case, case.model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        return Outcome("ort", _first_line(exc))
    ort_why = _first_difference(expected, original, case)
    if ort_why:
        # onnxruntime runs it but computes something else than the wheel expects: the passes
        # must still reproduce onnxruntime's own outputs, when those are deterministic.
        if _first_difference(original, _run_all(_session(case.model), case, case.model), case):
            return Outcome("ort", f"onnxruntime's own {ort_why} (and not deterministic)")
        expected = original
    inputs = case.data_sets[0][0]
    samples = [Sample(_feeds(model, inputs))]
    try:
        prepared, report = prepare(model, samples)
    except ShrinkError as exc:
        return _refusal(exc, "prepare")
    dropped = [s for s in report.steps if not s["applied"] and s["reason"].startswith("outputs moved")]
    if dropped:
        return Outcome("failed", f"prepare guard dropped '{dropped[0]['step']}': {dropped[0]['reason']}")
    try:
        out = save_model(prepared, scratch / "out.onnx")
        session = _session(str(out))
    except Exception as exc:  # noqa: BLE001
        return Outcome("failed", f"prepared model does not load: {_first_line(exc)}")
    try:
        why = _first_difference(expected, _run_all(session, case, prepared), case)
    except Exception as exc:  # noqa: BLE001
        return Outcome("failed", f"prepared model does not run: {_first_line(exc)}")
    if why:
        against = "onnxruntime's outputs on the original" if ort_why else "the expected outputs"
        return Outcome("failed", f"prepared model's {why} (against {against})")
    applied = tuple(s["step"].split(" ")[0] for s in report.steps if s["applied"])
    step_failures = tuple(f"{s['step'].split(' ')[0]}: {s['reason']}" for s in report.steps if not s["applied"])
    status, reason = ("ort", f"onnxruntime's own {ort_why}") if ort_why else ("passed", "")
    return Outcome(status, reason, applied=applied, step_failures=step_failures)


def _refusal(exc: ShrinkError, stage: str) -> Outcome:
    text = exc.one_line() if not exc.path else " ".join(exc.message.split())
    if isinstance(exc, UnsupportedModelError) and any(m in text for m in POLICY_MESSAGES):
        return Outcome("refused", f"{stage}: {text}")
    return Outcome("failed", f"{stage} refused: {text}")


def run_corpus(cases: list[Case]) -> dict[str, Outcome]:
    logging.disable(logging.WARNING)  # prepare logs skipped steps; the outcome says it all
    try:
        # In memory where there is a tmpfs: save_model fsyncs every file, which on a disk
        # took two thirds of the corpus's wall time; the bytes written are the same.
        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(prefix="onnx-corpus-", dir=shm if shm.is_dir() else None) as tmp:
            scratch = Path(tmp)
            return {case.key: run_case(case, scratch) for case in cases}
    finally:
        logging.disable(logging.NOTSET)


def load_known(section: str = "ort_cannot_run") -> dict[str, str]:
    return json.loads(KNOWN_FILE.read_text())[section]


def summary(results: dict[str, Outcome]) -> str:
    counts = Counter(o.status for o in results.values())
    steps = Counter(step for o in results.values() if o.status == "passed" for step in o.applied)
    lines = [f"{len(results)} cases: " + ", ".join(f"{k} {counts[k]}" for k in ("passed", "refused", "ort", "failed"))]
    lines.append("  steps applied in passed cases: " + ", ".join(f"{k} {v}" for k, v in sorted(steps.items())))
    lines += [f"  step failed (skipped): {k}: {f}" for k, o in sorted(results.items()) for f in o.step_failures]
    for status in ("failed", "refused"):
        lines += [f"  {status}: {k}: {o.reason}" for k, o in sorted(results.items()) if o.status == status]
    return "\n".join(lines)


# ----------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def results() -> dict[str, Outcome]:
    outcomes = run_corpus(load_corpus())
    print(summary(outcomes))
    return outcomes


def test_every_case_that_onnxruntime_runs_survives_preparation(results):
    failed = {k: o.reason for k, o in results.items() if o.status == "failed"}
    assert not failed, "load -> prepare -> save broke these cases:\n" + "\n".join(f"{k}: {r}" for k, r in sorted(failed.items()))


def test_cases_onnxruntime_cannot_run_are_exactly_the_known_ones(results):
    known = load_known()
    ort_now = {k: o.reason for k, o in results.items() if o.status == "ort"}
    new = sorted(set(ort_now) - set(known))
    healed = sorted(k for k in set(known) - set(ort_now) if k in results)
    assert not new, "onnxruntime cannot run these (add them to onnx_corpus_known.json with the reason):\n" + "\n".join(
        f"{k}: {ort_now[k]}" for k in new
    )
    assert not healed, "these known cases run now; remove them from onnx_corpus_known.json:\n" + "\n".join(
        f"{k}: now {results[k].status}" for k in healed
    )


def test_preparation_steps_fail_only_where_known(results):
    """A step that raises is skipped (the model stays correct), but is a lost optimisation:
    each one must be a known limitation of onnxruntime/onnx, not a regression of ours."""
    known = load_known("step_failures")
    now = {k: "; ".join(o.step_failures) for k, o in results.items() if o.step_failures}
    new = sorted(set(now) - set(known))
    healed = sorted(k for k in set(known) - set(now) if k in results)
    assert not new, "preparation steps now fail on:\n" + "\n".join(f"{k}: {now[k]}" for k in new)
    assert not healed, "these known step failures are gone; remove them from onnx_corpus_known.json:\n" + "\n".join(healed)


def test_corpus_is_whole(results):
    """The corpus really ran: the wheel's cases are all there, most pass, and the passes acted."""
    counts = Counter(o.status for o in results.values())
    assert len(results) >= 1900
    assert counts["passed"] >= 0.7 * len(results)
    steps = Counter(step for o in results.values() if o.status == "passed" for step in o.applied)
    assert steps["fold"] >= 0.95 * counts["passed"]  # onnxruntime's optimiser, saved and reloaded
    assert steps["opset"] >= 20  # opset 11/12 models upgraded to 13
    assert steps["remove"] == counts["passed"]
    refused = [o.reason for o in results.values() if o.status == "refused"]
    assert all(any(m in r for m in POLICY_MESSAGES) for r in refused)


def _write_known() -> int:
    results = run_corpus(load_corpus())
    known = {k: o.reason for k, o in sorted(results.items()) if o.status == "ort"}
    step_failures = {k: "; ".join(o.step_failures) for k, o in sorted(results.items()) if o.step_failures}
    import onnx as _onnx

    payload = {
        "about": "ort_cannot_run: cases of the onnx wheel's test corpus that onnxruntime itself cannot "
        "run (or whose outputs it computes differently), with the first line of the reason. "
        "step_failures: cases where a preparation step raised and was skipped (a limitation of "
        "onnxruntime/onnx, not of the model). Written by `python tests/test_onnx_corpus.py "
        "--write-known`; read by tests/test_onnx_corpus.py.",
        "onnx": _onnx.__version__,
        "onnxruntime": ort.__version__,
        "ort_cannot_run": known,
        "step_failures": step_failures,
    }
    KNOWN_FILE.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    print(summary(results))
    print(f"wrote {len(known)} known cases to {KNOWN_FILE}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-known"]:
        sys.exit(_write_known())
    print(summary(run_corpus(load_corpus())))
