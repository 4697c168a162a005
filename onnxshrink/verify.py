"""How close a candidate model's outputs are to a reference's: SQNR, cosine, top-1 agreement.

One implementation for the tests, the passes' own checks, ``shrink``'s report and ``bench``.
Figures accumulate over samples so that they can be computed while streaming data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Fidelity:
    """Agreement of a candidate with a reference over a set of samples."""

    samples: int
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None  # None when the first output is not class scores
    accuracy_reference: float | None = None  # task accuracy when labels were given
    accuracy_candidate: float | None = None
    #: Top-1 drop in points expected under the reference's own class probabilities (see
    #: :func:`class_probabilities`); ``None`` when the first output is not class scores.
    expected_drop_points: float | None = None

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return 100.0 * (self.accuracy_reference - self.accuracy_candidate)

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | str | None:
            if x is None:
                return None
            return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")

        return {
            "samples": self.samples,
            "sqnr_db": num(self.sqnr_db),
            "cosine": num(self.cosine),
            "max_abs_error": num(self.max_abs_error),
            "top1_agreement": self.top1_agreement,
            "accuracy_reference": self.accuracy_reference,
            "accuracy_candidate": self.accuracy_candidate,
            "accuracy_drop_points": self.accuracy_drop_points,
            "expected_drop_points": self.expected_drop_points,
        }


def looks_like_class_scores(output: np.ndarray) -> bool:
    """A [batch, classes] (or [batch, classes, 1, 1]) output with more than one class."""
    if output.size == 0:
        return False
    squeezed = output.reshape(output.shape[0], -1) if output.ndim >= 2 else None
    return squeezed is not None and output.ndim in (2, 4) and 1 < squeezed.shape[1] and (
        output.ndim == 2 or output.shape[2:] == (1, 1)
    )


def class_probabilities(scores: np.ndarray) -> np.ndarray | None:
    """The reference model's class probabilities per row of ``[rows, classes]`` scores.

    Rows that are already distributions (non-negative, summing to 1) are used as they are;
    otherwise the scores are read as logits (softmax; log-probabilities come out right too).
    Scores all in [0, 1] that do not sum to 1 (independent sigmoids, multi-label heads) give no
    distribution over classes: ``None``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return None
    sums = s.sum(axis=1)
    if np.all(s >= 0.0) and np.allclose(sums, 1.0, atol=1e-3):
        return s
    if np.all((s >= 0.0) & (s <= 1.0)):
        return None
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class FidelityMeter:
    """Accumulates reference-vs-candidate statistics sample by sample."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    max_abs: float = 0.0
    agree: int = 0
    rows: int = 0
    expected_loss: float = 0.0  # sum over rows of p(reference top-1) - p(candidate top-1)
    correct_ref: int = 0
    correct_cand: int = 0
    labelled: int = 0
    samples: int = 0
    classify: bool | None = None

    def update(self, reference: list[np.ndarray], candidate: list[np.ndarray], label: int | np.ndarray | None = None) -> None:
        self.samples += 1
        for ref, cand in zip(reference, candidate):
            r = np.asarray(ref, dtype=np.float64).ravel()
            c = np.asarray(cand, dtype=np.float64).ravel()
            if r.shape != c.shape:
                raise ValueError(f"output shapes differ: {np.shape(ref)} vs {np.shape(cand)}")
            diff = r - c
            self.signal += float(r @ r)
            self.noise += float(diff @ diff)
            self.dot += float(r @ c)
            self.ref_sq += float(r @ r)
            self.cand_sq += float(c @ c)
            if diff.size:
                self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        first_ref, first_cand = np.asarray(reference[0]), np.asarray(candidate[0])
        if self.classify is None:
            self.classify = looks_like_class_scores(first_ref)
        if self.classify:
            r_top = first_ref.reshape(first_ref.shape[0], -1).argmax(axis=1)
            c_top = first_cand.reshape(first_cand.shape[0], -1).argmax(axis=1)
            self.agree += int(np.sum(r_top == c_top))
            self.rows += len(r_top)
            flipped = r_top != c_top
            if flipped.any():
                # A flip between classes the reference cannot tell apart costs little
                # accuracy in expectation; a confident one costs up to a whole sample.
                probs = class_probabilities(first_ref.reshape(first_ref.shape[0], -1))
                rows = np.flatnonzero(flipped)
                self.expected_loss += (
                    float(np.sum(probs[rows, r_top[rows]] - probs[rows, c_top[rows]])) if probs is not None else float(len(rows))
                )
            if label is not None:
                self.labelled += len(r_top)
                self.correct_ref += int(np.sum(r_top == label))
                self.correct_cand += int(np.sum(c_top == label))

    def result(self) -> Fidelity:
        sqnr = sqnr_from_energies(self.signal, self.noise)
        denom = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.noise == 0.0 else 0.0)
        return Fidelity(
            samples=self.samples,
            sqnr_db=sqnr,
            cosine=cosine,
            max_abs_error=self.max_abs,
            top1_agreement=self.agree / self.rows if self.classify and self.rows else None,
            accuracy_reference=self.correct_ref / self.labelled if self.labelled else None,
            accuracy_candidate=self.correct_cand / self.labelled if self.labelled else None,
            expected_drop_points=100.0 * self.expected_loss / self.rows if self.classify and self.rows else None,
        )


def sqnr_from_energies(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB, for sums of squares that may have overflowed.

    ``inf`` for no noise; ``-inf`` for no signal or noise beyond the float range (overflowed
    outputs); ``nan`` when the signal itself is not finite.
    """
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or not math.isfinite(noise) or signal / noise == 0.0:
        return -math.inf
    if not math.isfinite(signal) or signal < 0.0:
        return math.nan
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """SQNR of one array pair in dB (``inf`` when identical)."""
    meter = FidelityMeter()
    meter.update([np.asarray(reference)], [np.asarray(candidate)])
    return meter.result().sqnr_db
