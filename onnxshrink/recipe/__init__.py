"""Recipes: reproducible compression pipelines as versioned YAML/JSON files.

A :class:`Recipe` is an ordered list of typed steps (``fold``, ``prune.magnitude``,
``prune.channels``, ``quantize.int8``, ``distill``, ``bench``) and a ``data`` section.
``onnxshrink shrink`` compiles its flags into one (``--save-recipe``, ``--dry-run``),
``onnxshrink run RECIPE MODEL -o OUT`` replays it, and ``onnxshrink auto`` writes the one that
reproduces the model it chose. The same recipe, model and data give byte-identical output.

Example::

    from onnxshrink.recipe import load_recipe, run_recipe
    outcome = run_recipe(load_recipe("int8.yaml"), "model.onnx", "model.int8.onnx")
"""

from __future__ import annotations

from typing import Any

from onnxshrink.recipe.recipe import RECIPE_VERSION, DataSpec, Recipe, dumps, load_recipe, parse_text, save_recipe
from onnxshrink.recipe.steps import (
    STEP_TYPES,
    BenchStep,
    ChannelPruneStep,
    DistillStep,
    FoldStep,
    Int8Step,
    MagnitudePruneStep,
    Step,
    step_options,
)


def run_recipe(*args: Any, **kwargs: Any) -> Any:
    """:func:`onnxshrink.shrink.run_recipe` (imported lazily: shrink imports this package)."""
    from onnxshrink.shrink import run_recipe as _run

    return _run(*args, **kwargs)


__all__ = [
    "RECIPE_VERSION",
    "STEP_TYPES",
    "BenchStep",
    "ChannelPruneStep",
    "DataSpec",
    "DistillStep",
    "FoldStep",
    "Int8Step",
    "MagnitudePruneStep",
    "Recipe",
    "Step",
    "dumps",
    "load_recipe",
    "parse_text",
    "run_recipe",
    "save_recipe",
    "step_options",
]
