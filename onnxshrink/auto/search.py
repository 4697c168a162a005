"""``onnxshrink auto``: the fastest model within an accuracy budget, on the target provider.

Candidates (see :mod:`onnxshrink.auto.space`) are built and scored by jobs
(:mod:`onnxshrink.auto.evaluate`) — in this process, in spawned worker processes
(``workers``) or as Ray tasks (``ray``) — and timed here, one at a time, interleaved with the
original on the target provider. After each candidate the state file is rewritten
atomically, so an interrupted run resumes where it stopped. At the end the passing models
on the latency/accuracy Pareto front are timed once more together, the fastest is written
with the recipe that reproduces it, and a report lists every candidate.

Files beside ``OUT`` (``OUT`` without ``.onnx`` = ``STEM``): ``STEM.recipe.yaml``,
``STEM.auto.json`` (report), ``STEM.auto-state.json`` (resume state) and ``STEM.auto/``
(the front's candidate models).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxshrink import __version__
from onnxshrink.auto.evaluate import EvalSpec, Job, run_job
from onnxshrink.auto.space import Candidate, Context, Search
from onnxshrink.bench.timing import measure_interleaved, paired_ratio
from onnxshrink.data import DataOptions, open_dataset
from onnxshrink.errors import ConfigError, DataError, ShrinkError
from onnxshrink.modelio import check_output_path, load_model
from onnxshrink.quantize.pipeline import split_samples
from onnxshrink.recipe import Recipe, save_recipe
from onnxshrink.runtime import make_session
from onnxshrink.verify import FidelityMeter, looks_like_class_scores

log = logging.getLogger(__name__)

REPORT_SCHEMA = "onnxshrink.auto/1"
#: The error recorded for a candidate that could not be built (worse than any real one).
FAILED_ERROR = 1e9
STATE_SCHEMA = "onnxshrink.auto-state/1"


@dataclass(frozen=True, kw_only=True)
class AutoOptions:
    """The ``auto`` command's options.

    Attributes:
        data: calibration data (and evaluation data when ``eval`` is not given: its
            held-back fifth, never used to calibrate).
        eval: evaluation data; labels make the target task accuracy, otherwise top-1
            agreement with the original (or output SQNR for outputs that are not class scores).
        train: distillation data (default: ``data``).
        max_drop: largest allowed accuracy (or agreement) drop in points.
        min_sqnr: target for outputs that are not class scores, in dB.
        provider: execution provider to time on.
        budget_s: wall-clock budget; the search stops (a running job is killed) in time to
            finish within it.
        workers: parallel accuracy jobs (spawned processes; 0: in this process).
        ray: Ray address for the jobs instead (``local`` starts a local Ray).
        resume: reuse the finished candidates of a previous run with the same settings.
        seed: for everything seeded (calibration, distillation).
        max_eval: score on at most this many evaluation samples.
        max_candidates: stop after this many finished candidates (in total, resumed included).
        distill: try distillation recovery (None: when torch is installed).
        distill_epochs, distill_samples: size of each distillation.
        latency_rounds: interleaved rounds per candidate (more for the final comparison).
    """

    data: str
    eval: str | None = None
    train: str | None = None
    max_drop: float = 1.0
    min_sqnr: float = 20.0
    provider: str = "cpu"
    budget_s: float = 1200.0
    workers: int = 1
    ray: str | None = None
    resume: bool = True
    seed: int = 0
    max_eval: int | None = None
    max_candidates: int | None = None
    distill: bool | None = None
    distill_epochs: int = 20
    distill_samples: int | None = None
    latency_rounds: int = 30
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop <= 100:
            raise ConfigError("--max-drop must be between 0 and 100 points")
        if self.budget_s <= 0:
            raise ConfigError("--budget must be positive")
        if self.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if self.distill_epochs < 1:
            raise ConfigError("--distill-epochs must be >= 1")


def parse_budget(text: str) -> float:
    """``90``, ``90s``, ``20m``, ``1.5h`` -> seconds."""
    t = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise ConfigError(f"--budget {text!r}: expected seconds or a duration like 90s, 20m, 1h") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--budget {text!r} must be positive")
    return value


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_id(source: str | None) -> str | None:
    if source is None or source == "random":
        return source
    p = Path(source)
    if p.is_file():
        return _sha256(p)
    return f"{p.resolve()}:{len(list(p.iterdir())) if p.is_dir() else 0}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_name(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".+-" else "_" for ch in key) + ".onnx"


def pareto_front(points: list[dict[str, Any]]) -> list[str]:
    """Keys of the candidates no other beats on both latency ratio and error (ties kept)."""
    front = []
    for a in points:
        dominated = any(
            b is not a and b["latency_ratio"] <= a["latency_ratio"] and b["error"] <= a["error"]
            and (b["latency_ratio"] < a["latency_ratio"] or b["error"] < a["error"])
            for b in points
        )  # fmt: skip
        if not dominated:
            front.append(a["key"])
    return sorted(front, key=lambda k: next(p["latency_ratio"] for p in points if p["key"] == k))


class _Executor:
    """Runs jobs in this process, a spawn process pool or Ray; can be stopped at a deadline."""

    def __init__(self, workers: int, ray_address: str | None) -> None:
        self.ray = None
        self.pool: cf.ProcessPoolExecutor | None = None
        if ray_address is not None:
            try:
                import ray
            except ImportError:
                raise ConfigError("--ray needs Ray: pip install 'onnxshrink[ray]'") from None
            if not ray.is_initialized():
                if ray_address == "local":
                    ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=ray_address, log_to_driver=False)
            self.ray = ray
            self.remote = ray.remote(run_job)
        elif workers > 0:
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: Job) -> Any:
        if self.ray is not None:
            return self.remote.remote(job)
        if self.pool is not None:
            return self.pool.submit(run_job, job)
        return job  # run lazily, in order, by result()

    def result(self, handle: Any, timeout: float) -> dict[str, Any]:
        """The job's result; TimeoutError past ``timeout`` seconds."""
        if timeout <= 0:
            raise TimeoutError
        if self.ray is not None:
            ready, _ = self.ray.wait([handle], timeout=timeout)
            if not ready:
                raise TimeoutError
            return self.ray.get(handle)  # type: ignore[no-any-return]
        if self.pool is not None:
            try:
                return handle.result(timeout=timeout)  # type: ignore[no-any-return]
            except cf.TimeoutError:
                raise TimeoutError from None
            except cf.process.BrokenProcessPool:
                raise ShrinkError("an auto worker process died (out of memory?)") from None
        return run_job(handle)

    def stop(self, pending: list[Any]) -> None:
        """Abandon ``pending`` jobs (killed, not awaited) and shut down."""
        if self.ray is not None:
            for h in pending:
                self.ray.cancel(h, force=True)
        if self.pool is not None:
            processes = list(getattr(self.pool, "_processes", {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            if pending:
                for p in processes:
                    p.kill()
            self.pool = None


@dataclass
class AutoResult:
    report: dict[str, Any]
    output: Path
    recipe_path: Path
    report_path: Path
    target_met: bool


class _Auto:
    def __init__(self, model_path: Path, output: Path, options: AutoOptions, echo: Callable[[str], None]) -> None:
        self.model_path, self.output, self.o, self.echo = model_path, output, options, echo
        stem = output.with_suffix("") if output.suffix == ".onnx" else output
        self.recipe_path = stem.with_name(stem.name + ".recipe.yaml")
        self.report_path = stem.with_name(stem.name + ".auto.json")
        self.state_path = stem.with_name(stem.name + ".auto-state.json")
        self.cand_dir = stem.with_name(stem.name + ".auto")

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        o = self.o
        check_output_path(self.output, input_path=self.model_path)
        model, _ = load_model(self.model_path)
        self.model_sha = _sha256(self.model_path)
        options = DataOptions(seed=o.seed, shapes=o.shapes)
        data = open_dataset(o.data, model, options)
        if o.eval is not None:
            ev = open_dataset(o.eval, model, options)
            source, start, stop = o.eval, 0, len(ev)
        else:
            if len(data) < 50:
                raise DataError("auto needs 50 samples or more to hold some back for evaluation (or give --eval DATA)", path=o.data)
            ev, source = data, o.data
            split = split_samples(len(data), len(data))
            start, stop = split.evaluation.start, split.evaluation.stop
        if o.max_eval is not None:
            stop = min(stop, start + o.max_eval)
        if stop <= start:
            raise DataError("no evaluation samples", path=source)
        reference_session = make_session(model, threads=1)
        reference, labels, feeds = [], [], []
        for i, sample in enumerate(ev):
            if i >= stop:
                break
            if i >= start:
                reference.append(reference_session.run(None, sample.feeds))
                labels.append(sample.label)
                if len(feeds) < 4:
                    feeds.append(sample.feeds)
        self.labelled = all(label is not None for label in labels)
        self.classify = looks_like_class_scores(reference[0][0])
        meter = FidelityMeter()
        for ref, label in zip(reference, labels):
            meter.update(ref, ref, label)
        self.reference_accuracy = meter.result().accuracy_reference
        self.evaluation = EvalSpec(os.path.abspath(source), start, stop, reference, labels, o.shapes, o.seed)
        self.feeds = feeds
        try:
            import torch  # noqa: F401

            has_torch = True
        except ImportError:
            has_torch = False
        self.distill = has_torch if o.distill is None else o.distill
        if self.distill and not has_torch:
            raise ConfigError("--distill needs PyTorch: pip install 'onnxshrink[train]'")
        self.ctx = Context(
            data=os.path.abspath(o.data), train=os.path.abspath(o.train) if o.train else None, provider=o.provider, seed=o.seed,
            shapes=o.shapes, distill_epochs=o.distill_epochs, distill_samples=o.distill_samples,
        )  # fmt: skip
        from onnxshrink.prune import analyze_channels

        self.groups = [g.producers[0] for g in analyze_channels(model).groups if g.prunable and g.producers]
        self.baseline_session = make_session(self.model_path, provider=o.provider, threads=1)
        self.fingerprint = {
            "onnxshrink": __version__, "model_sha256": self.model_sha, "data": _source_id(o.data),
            "eval": _source_id(o.eval), "train": _source_id(o.train), "evaluation": [start, stop],
            "max_drop": o.max_drop, "min_sqnr": o.min_sqnr, "provider": o.provider, "seed": o.seed,
            "distill": self.distill, "distill_epochs": o.distill_epochs, "distill_samples": o.distill_samples,
            "shapes": o.shapes,
        }  # fmt: skip

    def _load_state(self) -> dict[str, Any]:
        fresh = {"schema": STATE_SCHEMA, "fingerprint": self.fingerprint, "results": {}}
        if not self.o.resume or not self.state_path.exists():
            return fresh
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.echo(f"state file {self.state_path} is unreadable; starting afresh")
            return fresh
        if state.get("schema") != STATE_SCHEMA or state.get("fingerprint") != self.fingerprint:
            self.echo(f"state file {self.state_path} is from a run with other settings; starting afresh")
            return fresh
        return state  # type: ignore[no-any-return]

    def _save_state(self) -> None:
        _write_atomic(self.state_path, json.dumps(self.state, indent=1).encode())

    # ------------------------------------------------------------------ scoring
    def _error(self, fidelity: dict[str, Any]) -> tuple[bool, float]:
        """(meets the target, error): drop in points, or minus the SQNR in dB."""
        if self.classify:
            if self.labelled and fidelity.get("accuracy_drop_points") is not None:
                drop = float(fidelity["accuracy_drop_points"])
            else:
                drop = 100.0 * (1.0 - float(fidelity["top1_agreement"] or 0.0))
            return drop <= self.o.max_drop + 1e-9, round(drop, 4)
        sqnr = fidelity["sqnr_db"]
        sqnr = float(sqnr) if not isinstance(sqnr, str) else (math.inf if sqnr == "inf" else -math.inf)
        return sqnr >= self.o.min_sqnr, -min(sqnr, 1e9)

    def _verdict(self, c: Candidate) -> tuple[bool, float] | None:
        r = self.state["results"].get(c.key)
        return None if r is None else (r["meets"], r["error"])

    def _latency(self, model_bytes: bytes, rounds: int) -> dict[str, float]:
        session = make_session(model_bytes, provider=self.o.provider, threads=1)
        stats = measure_interleaved([self.baseline_session, session], self.feeds, warmup=5, rounds=rounds, max_seconds=15.0, min_seconds=1.0)
        return {"ratio": round(paired_ratio(stats[1], stats[0]), 4), "baseline_p50_ms": round(stats[0].p50, 4), "p50_ms": round(stats[1].p50, 4)}

    # ------------------------------------------------------------------ the run
    def run(self) -> AutoResult:
        started = time.perf_counter()
        o = self.o
        self._prepare()
        self.state = self._load_state()
        self.cand_dir.mkdir(exist_ok=True)
        resumed = [k for k in self.state["results"]]
        if resumed:
            self.echo(f"resuming: {len(resumed)} finished candidate(s) from {self.state_path}")
        reserve = min(30.0, 0.1 * o.budget_s + 2.0)  # the final timing and writing
        deadline = started + o.budget_s - reserve
        executor = _Executor(o.workers, o.ray)
        search = Search(self._verdict, groups=self.groups, max_drop=o.max_drop, distill=self.distill, epochs=o.distill_epochs)
        stop_reason = "search finished"
        evaluated_now: list[str] = []
        try:
            for wave in search.waves():
                todo = [c for c in wave if c.key not in self.state["results"]]
                cut = False
                if o.max_candidates is not None:
                    room = o.max_candidates - sum(1 for r in self.state["results"].values() if not r["probe"])
                    fresh = [c for c in todo if not c.probe]
                    if len(fresh) > max(room, 0):
                        todo, cut = [c for c in todo if c.probe] + fresh[: max(room, 0)], True
                if todo and time.perf_counter() >= deadline:
                    stop_reason = "budget"
                    break
                handles = [(c, executor.submit(self._job(c))) for c in todo]
                for i, (c, handle) in enumerate(handles):
                    try:
                        result = executor.result(handle, deadline - time.perf_counter())
                    except TimeoutError:
                        executor.stop([h for _, h in handles[i:]])
                        stop_reason = "budget"
                        break
                    self._record(c, result)
                    evaluated_now.append(c.key)
                if stop_reason == "budget":
                    break
                if cut:
                    stop_reason = f"--max-candidates {o.max_candidates} reached"
                    break
        finally:
            executor.stop([])
        return self._finish(started, stop_reason, evaluated_now)

    def _job(self, c: Candidate) -> Job:
        return Job(c.key, c.recipe(self.ctx).to_dict(), str(Path(self.model_path).resolve()), self.evaluation)

    def _record(self, c: Candidate, result: dict[str, Any]) -> None:
        if "failed" in result:
            entry = {**result, "candidate": c.describe(), "probe": c.probe, "meets": False, "error": FAILED_ERROR,
                     "index": len(self.state["results"]), "file": None, "latency": None}  # fmt: skip
            self.state["results"][c.key] = entry
            self._save_state()
            self.echo(f"  {c.key}: FAILED: {result['failed']}")
            return
        data = result.pop("model_bytes")
        meets, error = self._error(result["fidelity"])
        entry = {**result, "candidate": c.describe(), "probe": c.probe, "meets": meets, "error": error,
                 "index": len(self.state["results"]), "file": None, "latency": None}  # fmt: skip
        if not c.probe:
            entry["file"] = _file_name(c.key)
            _write_atomic(self.cand_dir / entry["file"], data)
            entry["latency"] = self._latency(data, self.o.latency_rounds)
        self.state["results"][c.key] = entry
        self._save_state()
        if c.probe:
            self.echo(f"  probe {c.protect[0][0]} pruned alone at {c.protect[0][1]:g}: {self._quality(entry)} ({result['seconds']:.1f} s)")
        else:
            n = sum(1 for r in self.state["results"].values() if not r["probe"])
            self.echo(
                f"[{n:>2}] {c.key}: {self._quality(entry)}, latency {entry['latency']['ratio']:.3f}x "
                f"{'meets' if meets else 'misses'} target ({result['seconds']:.1f} s)"
            )

    def _quality(self, entry: dict[str, Any]) -> str:
        f = entry["fidelity"]
        if self.classify and self.labelled and f.get("accuracy_candidate") is not None:
            return f"accuracy {100 * f['accuracy_candidate']:.2f}% (drop {entry['error']:.2f})"
        if self.classify:
            return f"agreement {100 * (f['top1_agreement'] or 0):.2f}% (drop {entry['error']:.2f})"
        return f"SQNR {-entry['error']:.1f} dB"

    # ------------------------------------------------------------------ the end
    def _finish(self, started: float, stop_reason: str, evaluated_now: list[str]) -> AutoResult:
        o = self.o
        failed = [{"key": k, "error": r["failed"]} for k, r in self.state["results"].items() if "failed" in r]
        results = [dict(r, key=k) for k, r in self.state["results"].items() if not r["probe"] and "failed" not in r]
        if not results:
            raise ShrinkError(f"no candidate finished within the budget ({o.budget_s:.0f} s); give a larger --budget", path=self.model_path)
        for r in results:
            r["latency_ratio"] = r["latency"]["ratio"]
        front = pareto_front(results)
        passing = [r for r in results if r["meets"]]
        # Time the contenders once more, together with the original, with more rounds.
        contenders = sorted(passing or results, key=lambda r: (r["latency_ratio"], r["error"]) if passing else (r["error"], r["latency_ratio"]))[:4]
        contenders = [r for r in contenders if (self.cand_dir / r["file"]).exists()]
        if len(contenders) > 1:
            sessions = [make_session(self.cand_dir / r["file"], provider=o.provider, threads=1) for r in contenders]
            stats = measure_interleaved([self.baseline_session, *sessions], self.feeds, warmup=5, rounds=2 * o.latency_rounds, max_seconds=20.0, min_seconds=2.0)
            for r, s in zip(contenders, stats[1:]):
                r["latency_final"] = round(paired_ratio(s, stats[0]), 4)
        def final(r: dict[str, Any]) -> float:
            return float(r.get("latency_final", r["latency_ratio"]))

        if passing:
            pool = [r for r in contenders if r["meets"]] or passing
            chosen = min(pool, key=lambda r: (final(r), r["error"], r["index"]))
        else:
            chosen = min(results, key=lambda r: (r["error"], final(r), r["index"]))
        recipe = Candidate(**_candidate_args(chosen["candidate"])).recipe(self.ctx)
        self._write_output(chosen, recipe)
        save_recipe(recipe, self.recipe_path)
        keep = set(front) | {chosen["key"]}
        for r in results:
            if r["key"] not in keep and r["file"] and (self.cand_dir / r["file"]).exists():
                (self.cand_dir / r["file"]).unlink()
        used = time.perf_counter() - started
        now = set(evaluated_now) & {r["key"] for r in results}
        rows = []
        for r in sorted(results, key=lambda r: r["index"]):
            rows.append({
                "key": r["key"], "candidate": r["candidate"], "meets": r["meets"], "error": r["error"],
                "fidelity": r["fidelity"], "latency": r["latency"], "latency_final": r.get("latency_final"),
                "sha256": r["sha256"], "size_bytes": r["size_bytes"], "macs": r["macs"], "seconds": r["seconds"],
                "resumed": r["key"] not in evaluated_now, "on_front": r["key"] in front, "chosen": r["key"] == chosen["key"],
            })  # fmt: skip
        probes = [{"key": k, "group": r["candidate"]["protect"][0][0], "ratio": r["candidate"]["protect"][0][1], "error": r["error"]}
                  for k, r in self.state["results"].items() if r["probe"] and "failed" not in r]  # fmt: skip
        report = {
            "schema": REPORT_SCHEMA,
            "onnxshrink_version": __version__,
            "input": str(self.model_path),
            "input_sha256": self.model_sha,
            "output": str(self.output),
            "output_sha256": chosen["sha256"],
            "recipe": str(self.recipe_path),
            "report": str(self.report_path),
            "target": {"kind": "max_drop_points" if self.classify else "min_sqnr_db", "value": o.max_drop if self.classify else o.min_sqnr,
                       "measure": ("accuracy" if self.labelled else "top1_agreement") if self.classify else "sqnr_db"},
            "reference_accuracy": self.reference_accuracy,
            "evaluation": {"source": self.evaluation.source, "samples": self.evaluation.stop - self.evaluation.start},
            "provider": o.provider,
            "budget": {"limit_s": o.budget_s, "used_s": round(used, 1), "stop_reason": stop_reason},
            "candidates_total": len(results),
            "candidates_evaluated_now": len(now),
            "candidates_resumed": len(results) - len(now),
            "target_met": chosen["meets"],
            "chosen": chosen["key"],
            "pareto_front": front,
            "candidates": rows,
            "sensitivity_probes": probes,
            "failed": failed,
            "distillation": self.distill,
        }
        _write_atomic(self.report_path, (json.dumps(report, indent=2) + "\n").encode())
        return AutoResult(report, self.output, self.recipe_path, self.report_path, chosen["meets"])

    def _write_output(self, chosen: dict[str, Any], recipe: Recipe) -> None:
        path = self.cand_dir / chosen["file"]
        if path.exists() and _sha256(path) == chosen["sha256"]:
            _write_atomic(self.output, path.read_bytes())
            return
        from onnxshrink.shrink import run_recipe

        self.echo(f"rebuilding {chosen['key']} from its recipe")
        run_recipe(recipe, self.model_path, self.output, measure=False)
        if _sha256(self.output) != chosen["sha256"]:
            log.warning("the rebuilt model differs from the evaluated candidate (sha256); the environment changed?")


def _candidate_args(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "ratio": d["ratio"], "protect": tuple((n, r) for n, r in d["protect"]), "method": d["method"],
        "per_channel": d["per_channel"], "fallback": d["fallback_max_drop"], "epochs": d["distill_epochs"],
        "round_to": d["round_to"],
    }  # fmt: skip


def run_auto(model: str | os.PathLike[str], output: str | os.PathLike[str], options: AutoOptions, *, echo: Callable[[str], None] = print) -> AutoResult:
    """Search for the fastest model meeting the accuracy target; see the module docstring."""
    try:
        return _Auto(Path(model), Path(output), options, echo).run()
    except ShrinkError as exc:
        if exc.path is None and not isinstance(exc, ConfigError):
            exc.path = str(model)
        raise


def render_report(report: dict[str, Any]) -> str:
    """The report as a table: every candidate, the front and the chosen one marked."""
    from onnxshrink.report import format_table

    rows = []
    for r in report["candidates"]:
        mark = "*" if r["chosen"] else ("F" if r["on_front"] else "")
        lat = r["latency_final"] if r["latency_final"] is not None else r["latency"]["ratio"]
        rows.append((mark, r["key"], f"{r['error']:.2f}", "yes" if r["meets"] else "no", f"{lat:.3f}", f"{r['size_bytes'] / 1024:.0f} KiB",
                     "resumed" if r["resumed"] else f"{r['seconds']:.1f} s"))  # fmt: skip
    t = report["target"]
    what = "drop (points)" if t["kind"] == "max_drop_points" else "-SQNR (dB)"
    lines = [
        format_table(rows, ["", "candidate", what, "meets", "latency ratio", "size", "time"], align="llrlrrr"),
        "",
        f"* chosen, F on the latency/accuracy Pareto front. Target: {t['measure']} {'drop <= ' + str(t['value']) + ' points' if t['kind'] == 'max_drop_points' else 'SQNR >= ' + str(t['value']) + ' dB'}"
        + (f" (original accuracy {100 * report['reference_accuracy']:.2f}%)" if report.get("reference_accuracy") is not None else ""),
        f"{report['candidates_total']} candidates ({report['candidates_resumed']} resumed, {len(report.get('failed', []))} failed), "
        f"{report['budget']['used_s']:.0f} s of "
        f"{report['budget']['limit_s']:.0f} s budget, stopped: {report['budget']['stop_reason']}",
        f"chosen: {report['chosen']} -> {report['output']} ({'meets the target' if report['target_met'] else 'TARGET NOT MET: the most accurate model found'})",
        f"recipe: {report['recipe']}   report: {report['report']}",
    ]
    return "\n".join(lines)
