"""``onnxshrink auto``: the fastest model within an accuracy budget, and its recipe."""

from __future__ import annotations

import click

from onnxshrink.cli._options import MODEL_PATH, echo_json, json_option, shape_option
from onnxshrink.errors import GateFailed
from onnxshrink.stats import parse_shape_overrides


@click.command(name="auto")
@click.argument("model", type=MODEL_PATH)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the chosen model.")
@click.option("--data", required=True, metavar="DATA", help="Calibration data (.npz, folder); its held-back fifth judges accuracy unless --eval is given.")
@click.option("--eval", "eval_data", metavar="DATA", help="Evaluation data (labels: task accuracy; otherwise agreement with the original).")
@click.option("--train", metavar="DATA", help="Distillation data (default: --data).")
@click.option("--max-drop", type=click.FloatRange(0, 100), default=1.0, show_default=True, help="Largest allowed accuracy drop in points.")
@click.option("--min-sqnr", type=float, default=20.0, show_default=True, help="Target for models whose output is not class scores (dB).")
@click.option("--provider", default="cpu", show_default=True, help="Execution provider to measure latency on.")
@click.option("--budget", default="20m", show_default=True, help="Time budget: seconds, or 90s / 20m / 1h.")
@click.option("--workers", type=click.IntRange(0), default=1, show_default=True,
              help="Parallel accuracy jobs in spawned processes (0: in this process, where a running job cannot be stopped at the "
              "budget). Latency is always measured here, one model at a time.")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Run the accuracy jobs as Ray tasks on this cluster ('local' starts one); needs the ray extra.")
@click.option("--resume/--fresh", default=True, show_default=True, help="Reuse finished candidates of an interrupted run with the same settings.")
@click.option("--distill/--no-distill", default=None, help="Try distillation recovery (default: when torch is installed).")
@click.option("--distill-epochs", type=click.IntRange(1), default=20, show_default=True, help="Epochs of each distillation.")
@click.option("--distill-samples", type=click.IntRange(1), help="Distil on at most this many samples.")
@click.option("--max-eval", type=click.IntRange(1), help="Judge on at most this many evaluation samples.")
@click.option("--max-candidates", type=click.IntRange(1), help="Stop after this many candidates (resumed ones count).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration and distillation.")
@shape_option
@json_option
def auto_command(model: str, output: str, data: str, eval_data: str | None, train: str | None, max_drop: float, min_sqnr: float,
                 provider: str, budget: str, workers: int, ray_address: str | None, resume: bool, distill: bool | None,
                 distill_epochs: int, distill_samples: int | None, max_eval: int | None, max_candidates: int | None,
                 seed: int, shapes: tuple[str, ...], as_json: bool) -> None:  # fmt: skip
    """Find the fastest compressed MODEL that loses at most --max-drop points, on --provider.

    \b
    Searches channel-pruning ratios (coarse to fine, then per layer where a sensitivity
    probe says so), int8 calibration method and granularity, the fp32-fallback target and,
    with torch, distillation; each candidate's accuracy is measured on held-back data and
    its latency interleaved with the original's. Writes OUTPUT, the recipe that reproduces
    it (OUT.recipe.yaml; 'onnxshrink run' gives the same bytes), the report with every
    candidate and the Pareto front (OUT.auto.json) and a state file for --resume.

    \b
    Example:
      onnxshrink auto model.onnx --data calib.npz --eval eval.npz --max-drop 1 --budget 10m -o fast.onnx

    Exit code 3 when no candidate meets the target (the most accurate one is written).
    """
    from onnxshrink.auto import AutoOptions, parse_budget, render_report, run_auto

    options = AutoOptions(
        data=data, eval=eval_data, train=train, max_drop=max_drop, min_sqnr=min_sqnr, provider=provider,
        budget_s=parse_budget(budget), workers=workers, ray=ray_address, resume=resume, seed=seed, max_eval=max_eval,
        max_candidates=max_candidates, distill=distill, distill_epochs=distill_epochs, distill_samples=distill_samples,
        shapes=parse_shape_overrides(shapes),
    )  # fmt: skip
    result = run_auto(model, output, options, echo=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(result.report)
    else:
        click.echo(render_report(result.report))
    if not result.target_met:
        raise GateFailed("no candidate met the accuracy target; the most accurate one was written", path=output)
