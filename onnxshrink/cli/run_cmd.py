"""``onnxshrink run``: replay a recipe on a model."""

from __future__ import annotations

import sys

import click

from onnxshrink.cli._options import MODEL_PATH, json_option
from onnxshrink.cli.shrink_cmd import report_outcome
from onnxshrink.recipe import load_recipe
from onnxshrink.shrink import run_recipe


@click.command(name="run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
@click.argument("model", type=MODEL_PATH)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the compressed model.")
@click.option("--calib", "calibration", metavar="DATA", help="Calibration data, overriding the recipe's data.calibration.")
@json_option
def run_command(recipe: str, model: str, output: str, calibration: str | None, as_json: bool) -> None:
    """Apply the steps of RECIPE (YAML or JSON) to MODEL and write OUTPUT.

    \b
    The same recipe, model and data give byte-identical output; the output's metadata
    records the recipe, the onnxshrink and onnxruntime versions and the model's sha256.
    Make a recipe with 'onnxshrink shrink ... --save-recipe FILE', by hand (see
    'onnxshrink recipe show'), or with 'onnxshrink auto'.

    \b
    Example:
      onnxshrink run examples/recipes/int8.yaml sample_models/resnet_mini.onnx -o out.onnx

    Exit code 3 when a gate in the recipe (int8 max_drop/min_sqnr, bench min_speedup) fails;
    the output is still written.
    """
    parsed = load_recipe(recipe)
    outcome = run_recipe(parsed, model, output, calibration=calibration, progress=not as_json and sys.stderr.isatty())
    report_outcome(outcome, as_json=as_json, output=output)
