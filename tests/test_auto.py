"""`onnxshrink auto`: search, report, recipe reproduction, resume, parallel and Ray jobs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLES
from onnxshrink.auto import AutoOptions, Candidate, Search, pareto_front, parse_budget, run_auto
from onnxshrink.cli import main
from onnxshrink.errors import EXIT_OK, ConfigError, ShrinkError
from onnxshrink.recipe import load_recipe, run_recipe

MODEL = SAMPLES / "resnet_mini.onnx"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[str, str]:
    """100 unlabelled calibration digits and 100 labelled evaluation digits (fast candidates)."""
    folder = tmp_path_factory.mktemp("digits")
    calib = np.load(SAMPLES / "digits_calib.npz")["input"][:100]
    ev = np.load(SAMPLES / "digits_eval.npz")
    np.savez(folder / "calib.npz", input=calib)
    np.savez(folder / "eval.npz", input=ev["input"][:100], labels=ev["labels"][:100])
    return str(folder / "calib.npz"), str(folder / "eval.npz")


def options(data: tuple[str, str], **kw) -> AutoOptions:
    base = dict(data=data[0], eval=data[1], max_drop=1.0, distill=False, budget_s=300, workers=0, latency_rounds=5)
    return AutoOptions(**{**base, **kw})


def test_auto_writes_model_recipe_report_and_the_recipe_reproduces_it(small_data, tmp_path, capsys):
    out = tmp_path / "best.onnx"
    code = main(["auto", str(MODEL), "--data", small_data[0], "--eval", small_data[1], "--no-distill", "--workers", "0",
                 "--max-candidates", "3", "--budget", "5m", "-o", str(out), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    report = json.loads(captured.out)
    assert report["schema"] == "onnxshrink.auto/1"
    assert [c["key"] for c in report["candidates"]] == [
        "int8-auto-pc", "prune0.25+int8-auto-pc", "prune0.5+int8-auto-pc"]  # fmt: skip
    assert report["candidates_total"] == 3 and report["budget"]["stop_reason"] == "--max-candidates 3 reached"
    assert report["pareto_front"] and report["chosen"] in report["pareto_front"]
    assert report["target_met"] and report["chosen"] == "int8-auto-pc"  # pruning 25% without recovery costs > 1 point
    assert report["reference_accuracy"] is not None and report["target"]["measure"] == "accuracy"
    assert sum(c["chosen"] for c in report["candidates"]) == 1
    assert "[ 1] int8-auto-pc: accuracy" in captured.err  # one progress line per candidate
    assert sha(out) == report["output_sha256"]
    assert json.loads((tmp_path / "best.auto.json").read_text()) == report
    # The recipe beside the output reproduces the same bytes.
    recipe = load_recipe(tmp_path / "best.recipe.yaml")
    run_recipe(recipe, MODEL, tmp_path / "again.onnx", measure=False)
    assert sha(tmp_path / "again.onnx") == sha(out)


def test_interrupted_run_resumes_without_reevaluating(small_data, tmp_path):
    out = tmp_path / "r.onnx"
    lines: list[str] = []
    first = run_auto(MODEL, out, options(small_data, max_candidates=2), echo=lines.append)
    assert first.report["candidates_total"] == 2
    state = json.loads((tmp_path / "r.auto-state.json").read_text())
    assert list(state["results"]) == ["int8-auto-pc", "prune0.25+int8-auto-pc"]
    # Rerun with the same settings and room for two more, in 2 worker processes.
    lines.clear()
    second = run_auto(MODEL, out, options(small_data, max_candidates=4, workers=2), echo=lines.append)
    rows = second.report["candidates"]
    assert [r["key"] for r in rows] == ["int8-auto-pc", "prune0.25+int8-auto-pc", "prune0.5+int8-auto-pc", "prune0.75+int8-auto-pc"]
    assert [r["resumed"] for r in rows] == [True, True, False, False]
    assert second.report["candidates_evaluated_now"] == 2
    assert lines[0].startswith("resuming: 2 finished candidate(s)")
    evaluated = [line for line in lines if line.startswith("[")]
    assert len(evaluated) == 2 and all("prune0.25" not in line and "int8-auto-pc:" not in line.split("+")[0] for line in evaluated)
    # Resumed results are untouched; the new ones ran in other processes and match in-process builds.
    state2 = json.loads((tmp_path / "r.auto-state.json").read_text())
    for key in ("int8-auto-pc", "prune0.25+int8-auto-pc"):
        assert state2["results"][key] == state["results"][key]
    assert len({state2["results"][k]["pid"] for k in ("prune0.5+int8-auto-pc", "prune0.75+int8-auto-pc")} - {state["results"]["int8-auto-pc"]["pid"]}) >= 1
    # --fresh starts over.
    third = run_auto(MODEL, out, options(small_data, max_candidates=1, resume=False), echo=lines.append)
    assert third.report["candidates_total"] == 1 and third.report["candidates_resumed"] == 0


def test_other_settings_do_not_resume(small_data, tmp_path):
    out = tmp_path / "s.onnx"
    run_auto(MODEL, out, options(small_data, max_candidates=1), echo=lambda _: None)
    lines: list[str] = []
    result = run_auto(MODEL, out, options(small_data, max_candidates=1, max_drop=2.0), echo=lines.append)
    assert any("other settings; starting afresh" in line for line in lines)
    assert result.report["candidates_resumed"] == 0


def test_budget_too_small_is_a_one_line_error(small_data, tmp_path):
    with pytest.raises(ShrinkError, match="no candidate finished within the budget"):
        run_auto(MODEL, tmp_path / "t.onnx", options(small_data, budget_s=0.5, workers=1), echo=lambda _: None)


def test_search_is_deterministic_given_verdicts():
    def verdict_for(passing_up_to: float):
        def verdict(c: Candidate):
            return (c.ratio <= passing_up_to and not c.epochs) or c.epochs > 0, c.ratio * 10

        return verdict

    def keys(search: Search) -> list[list[str]]:
        return [[c.key for c in wave] for wave in search.waves()]

    a = keys(Search(verdict_for(0.3), groups=["g1", "g2", "g3"], max_drop=1.0, distill=True, epochs=5))
    b = keys(Search(verdict_for(0.3), groups=["g1", "g2", "g3"], max_drop=1.0, distill=True, epochs=5))
    assert a == b
    assert a[0] == ["int8-auto-pc", "prune0.25+int8-auto-pc", "prune0.5+int8-auto-pc", "prune0.75+int8-auto-pc"]
    assert a[1] == ["prune0.3125+int8-auto-pc", "prune0.375+int8-auto-pc", "prune0.4375+int8-auto-pc"]
    assert a[2] == ["prune0.265625+int8-auto-pc", "prune0.28125+int8-auto-pc", "prune0.296875+int8-auto-pc"]
    assert a[3][0] == "prune0.3125-align8+int8-auto-pc" and len(a[3]) == 6  # aligned, up the coarse grid
    assert a[4][-1] == "prune0.3125+int8-auto-pc-fb0.25"  # calibration, granularity, fallback variants
    assert all(k.startswith("probe:") for k in a[5]) and len(a[5]) == 3
    assert [len(w) for w in a[6:]] == [2, 1, 1]  # per-layer protection (1 and 2 groups), then distillation
    assert a[7] == ["prune0.5-align16+distill5+int8-auto-pc"] and a[8] == ["prune0.75-align16+distill5+int8-auto-pc"]


def test_a_candidate_that_cannot_be_built_is_recorded_as_failed(small_data, tmp_path):
    from onnxshrink.auto.evaluate import EvalSpec, Job, run_job

    recipe = {"version": 1, "data": {"calibration": str(tmp_path / "missing.npz")}, "steps": [{"type": "quantize.int8"}]}
    result = run_job(Job("k", recipe, str(MODEL), EvalSpec(small_data[1], 0, 1, [], [], {}, 0)))
    assert result["key"] == "k" and "data not found" in result["failed"]


def test_pareto_front_and_budget_parsing():
    points = [
        {"key": "a", "latency_ratio": 0.5, "error": 0.2},
        {"key": "b", "latency_ratio": 0.4, "error": 3.0},
        {"key": "c", "latency_ratio": 0.6, "error": 0.3},  # dominated by a
        {"key": "d", "latency_ratio": 0.7, "error": 0.0},
    ]
    assert pareto_front(points) == ["b", "a", "d"]
    assert parse_budget("20m") == 1200 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400 and parse_budget("45") == 45
    with pytest.raises(ConfigError):
        parse_budget("soon")


def test_ray_jobs(small_data, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'onnxshrink[ray]')")
    try:
        result = run_auto(MODEL, tmp_path / "ray.onnx", options(small_data, max_candidates=2, ray="local", workers=1), echo=lambda _: None)
    finally:
        ray.shutdown()
    assert result.report["candidates_total"] == 2
    recipe = load_recipe(result.recipe_path)
    run_recipe(recipe, MODEL, tmp_path / "again.onnx", measure=False)
    assert sha(tmp_path / "again.onnx") == result.report["output_sha256"]
