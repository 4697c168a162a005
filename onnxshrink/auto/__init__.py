"""``onnxshrink auto``: search pruning, int8 and distillation settings for the fastest model
that stays within an accuracy budget, measured on the target provider. See
:mod:`onnxshrink.auto.search` (the driver) and :mod:`onnxshrink.auto.space` (what is searched)."""

from __future__ import annotations

from onnxshrink.auto.search import AutoOptions, AutoResult, pareto_front, parse_budget, render_report, run_auto
from onnxshrink.auto.space import Candidate, Search

__all__ = ["AutoOptions", "AutoResult", "Candidate", "Search", "pareto_front", "parse_budget", "render_report", "run_auto"]
