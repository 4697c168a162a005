"""Deployment gates: pass/fail checks on the benchmark's measured figures.

Every gate applies to every candidate (each model after the first) and compares one figure:

* ``min_speedup``: ``p50(baseline) / p50(candidate) >= X`` (interleaved latencies);
* ``max_drop``: with labelled data, the top-1 accuracy drop ``100 * (top1(baseline) -
  top1(candidate))`` in percentage points; without labels, ``100 * (1 - agreement)``, where
  agreement is the share of samples whose top-1 class matches the baseline's. ``<= POINTS``;
* ``min_agreement``: top-1 agreement with the baseline ``>= F`` (a fraction, 0..1);
* ``max_size``: the candidate's size on disk (model file + external data) in MB (10^6 bytes)
  ``<= MB``.

A gate whose figure cannot be measured (a model whose first output is not class scores has
no top-1 agreement) fails, with the reason in ``detail``: a pipeline should not pass
silently on a check that did not happen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GateSpec:
    """The thresholds given on the command line (``None``: gate not asked for)."""

    min_speedup: float | None = None
    max_drop: float | None = None
    min_agreement: float | None = None
    max_size_mb: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass
class Gate:
    name: str  # min_speedup | max_drop | min_agreement | max_size
    model: str
    threshold: float
    value: float | None
    passed: bool
    detail: str

    def __post_init__(self) -> None:
        # numpy scalars compare to numpy bools, which json cannot write.
        self.value = None if self.value is None else float(self.value)
        self.passed = bool(self.passed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_UNMEASURABLE = "not measurable: the first output is not class scores"


def _fidelity(model: dict[str, Any]) -> dict[str, Any]:
    return (model.get("vs_baseline") or {}).get("fidelity") or {}


def evaluate(spec: GateSpec, models: list[dict[str, Any]], *, data_kind: str) -> list[Gate]:
    """The gates for ``models`` (the ``models`` list of a bench JSON payload)."""
    baseline, candidates = models[0], models[1:]
    gates: list[Gate] = []
    for cand in candidates:
        name = cand["name"]
        if spec.min_speedup is not None:
            speedup = cand["vs_baseline"]["speedup"]
            detail = f"p50 {baseline['name']} / p50 {name}"
            gates.append(
                Gate("min_speedup", name, spec.min_speedup, speedup, speedup >= spec.min_speedup, detail)
            )
        if spec.max_drop is not None:
            gates.append(_drop_gate(spec.max_drop, baseline, cand, data_kind))
        if spec.min_agreement is not None:
            agreement = _fidelity(cand).get("top1_agreement")
            if agreement is None:
                gates.append(Gate("min_agreement", name, spec.min_agreement, None, False, _UNMEASURABLE))
            else:
                detail = f"top-1 agreement with {baseline['name']} on {_data_words(data_kind)}"
                passed = agreement >= spec.min_agreement
                gates.append(Gate("min_agreement", name, spec.min_agreement, agreement, passed, detail))
        if spec.max_size_mb is not None:
            mb = cand["size"]["total_bytes"] / 1e6
            detail = "model file + external data, MB (10^6 bytes)"
            gates.append(Gate("max_size", name, spec.max_size_mb, mb, mb <= spec.max_size_mb, detail))
    return gates


def _data_words(data_kind: str) -> str:
    return {"labelled": "labelled data", "unlabelled": "unlabelled data", "random": "RANDOM inputs"}.get(
        data_kind, data_kind
    )


def _drop_gate(threshold: float, baseline: dict[str, Any], cand: dict[str, Any], data_kind: str) -> Gate:
    name = cand["name"]
    base_acc = (baseline.get("accuracy") or {}).get("top1")
    cand_acc = (cand.get("accuracy") or {}).get("top1")
    if base_acc is not None and cand_acc is not None:
        drop = 100.0 * (base_acc - cand_acc)
        return Gate(
            "max_drop",
            name,
            threshold,
            drop,
            drop <= threshold,
            "top-1 accuracy drop, points (labelled data)",
        )
    agreement = _fidelity(cand).get("top1_agreement")
    if agreement is None:
        return Gate("max_drop", name, threshold, None, False, _UNMEASURABLE)
    drop = 100.0 * (1.0 - agreement)
    detail = f"100 x (1 - top-1 agreement), points, on {_data_words(data_kind)}"
    return Gate("max_drop", name, threshold, drop, drop <= threshold, detail)
