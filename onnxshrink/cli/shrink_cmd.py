"""``onnxshrink shrink``: compress a model and report what it gained and lost."""

from __future__ import annotations

import os
import sys

import click

from onnxshrink.cli._options import MODEL_PATH, echo_json, json_option, shape_option
from onnxshrink.data import DataOptions, ImagePreprocess
from onnxshrink.errors import ConfigError, GateFailed
from onnxshrink.prune import ChannelPruneConfig, MagnitudePruneConfig
from onnxshrink.quantize import Int8Config
from onnxshrink.quantize.config import METHODS
from onnxshrink.report import format_pairs, format_table, human_bytes, human_count, section
from onnxshrink.recipe import dumps
from onnxshrink.recipe import save_recipe as save_recipe_file
from onnxshrink.shrink import ShrinkOptions, ShrinkOutcome, recipe_from_options, run_recipe
from onnxshrink.stats import parse_shape_overrides


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, _, w = text.lower().partition("x")
        return (int(h), int(w or h))
    except ValueError:
        raise ConfigError("--image-size must be HxW, e.g. 224x224") from None


@click.command()
@click.argument("model", type=MODEL_PATH)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the compressed model (required unless --dry-run).")
@click.option("--quantize", type=click.Choice(["int8", "none"]), default="int8", show_default=True, help="Quantization to apply.")
@click.option(
    "--calib",
    "calibration",
    metavar="DATA",
    help="Calibration data: a .npz (keys = input names, first axis = samples), a folder of .npz "
    "(one feed each), an image folder, or 'random' (accuracy then unknown).",
)
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True, help="Activation range calibration.")
@click.option("--max-drop", type=float, help="Largest allowed top-1 drop in points: accuracy when the data has labels, else disagreement with fp32. "
              "Without it: at most 1.0 point of expected accuracy drop (each flip weighted by the fp32 model's own "
              "confidence, so near-ties cost ~0) or SQNR >= 30 dB.")
@click.option("--min-sqnr", type=float, help="Smallest allowed output SQNR in dB (for models whose output is not class scores).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep matching nodes in fp32 (fnmatch on node names, or re:REGEX). Repeatable.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True, help="Activation integer type.")
@click.option("--reduce-range/--full-range", default=None, help="7-bit weights (for x86 CPUs without VNNI). Default: decided from this CPU.")
@click.option("--no-fusion-aware", is_flag=True, help="Keep Q/DQ on units that the provider does not fuse (usually slower).")
@click.option("--calib-count", type=click.IntRange(1), default=512, show_default=True, help="Use at most this many calibration samples.")
@click.option("--provider", default="cpu", show_default=True, help="Execution provider the model is for (fusion lint and timing).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Threads for the latency comparison.")
@click.option("--no-timing", is_flag=True, help="Skip the latency comparison against the original.")
@click.option("--image-size", metavar="HxW", help="Image folders: resize to this size (default: the model's input size).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True, help="Image folders: tensor layout.")
@click.option("--mean", metavar="M1,M2,M3", help="Image folders: per-channel mean after scaling (e.g. 0.485,0.456,0.406).")
@click.option("--std", metavar="S1,S2,S3", help="Image folders: per-channel std (e.g. 0.229,0.224,0.225).")
@click.option("--scale", type=float, default=1 / 255, show_default="1/255", help="Image folders: pixel multiplier applied first.")
@click.option("--color", type=click.Choice(["RGB", "BGR", "L"]), default="RGB", show_default=True, help="Image folders: channel order.")
@shape_option
@click.option("--prune-channels", type=click.FloatRange(0, 1, max_open=True), metavar="RATIO",
              help="Structured pruning: remove this fraction of the prunable channels of each group (really faster).")
@click.option("--prune-macs", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="FRACTION",
              help="Structured pruning to remove this fraction of the MACs (instead of --prune-channels).")
@click.option("--prune-importance", type=click.Choice(["l1", "l2", "bn_gamma"]), default="l1", show_default=True,
              help="Channel importance for structured pruning.")
@click.option("--prune-round-to", type=click.IntRange(1), default=1, show_default=True, help="Keep channel counts a multiple of this.")
@click.option("--prune-magnitude", type=click.FloatRange(0, 1, max_open=True), metavar="SPARSITY",
              help="Unstructured pruning: zero this fraction of the weights (smaller gzip, no speed-up).")
@click.option("--prune-threshold", type=click.FloatRange(0, min_open=True), metavar="EPS", help="Unstructured pruning: zero weights with |w| < EPS.")
@click.option("--prune-scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Magnitude pruning: rank weights across layers (global) or within each layer.")
@click.option("--prune-first-last", is_flag=True, help="Magnitude pruning: also prune the first and last weighted layers.")
@click.option("--prune-exclude", multiple=True, metavar="PATTERN", help="Never prune matching nodes/weights (fnmatch or re:REGEX). Repeatable.")
@click.option("--recalibrate-bn/--no-recalibrate-bn", default=None,
              help="After pruning, re-measure BatchNorm statistics on the --calib data (default: when both exist).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random calibration data.")
@click.option("--save-recipe", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write these flags as a recipe file (YAML; JSON if FILE ends in .json) for 'onnxshrink run'.")
@click.option("--dry-run", is_flag=True, help="Print the recipe these flags make (and write --save-recipe) without running it.")
@json_option
def shrink_command(model: str, output: str | None, quantize: str, calibration: str | None, method: str, max_drop: float | None,
                   min_sqnr: float | None, exclude: tuple[str, ...], per_tensor: bool, activation_type: str,
                   reduce_range: bool | None, no_fusion_aware: bool, calib_count: int, provider: str, threads: int,
                   no_timing: bool, image_size: str | None, layout: str, mean: str | None, std: str | None,
                   scale: float, color: str, shapes: tuple[str, ...], prune_channels: float | None,
                   prune_macs: float | None, prune_importance: str, prune_round_to: int, prune_magnitude: float | None,
                   prune_threshold: float | None, prune_scope: str, prune_first_last: bool,
                   prune_exclude: tuple[str, ...], recalibrate_bn: bool | None, seed: int, save_recipe: str | None,
                   dry_run: bool, as_json: bool) -> None:  # fmt: skip
    """Compress MODEL into OUTPUT and report size, speed and fidelity against the original.

    \b
    int8 (default): static QDQ with per-channel int8 weights and calibrated uint8
    activations, laid out so that onnxruntime fuses it into int8 kernels; units the
    provider cannot fuse stay fp32, and if accuracy drops more than the target the most
    sensitive nodes are kept in fp32 too. The report names every fp32 node and why.

    \b
    Pruning (before quantization): --prune-channels removes whole channels (smaller and
    faster in any runtime); --prune-magnitude zeroes small weights (compresses, no speed).

    \b
    Examples:
      onnxshrink shrink model.onnx -o model.int8.onnx --calib calib.npz
      onnxshrink shrink model.onnx -o small.onnx --calib calib.npz --prune-channels 0.5
      onnxshrink shrink model.onnx -o out.onnx --calib images/ --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
      onnxshrink shrink model.onnx -o out.onnx --calib calib.npz --max-drop 0.5 --json

    The flags compile into a recipe: --save-recipe FILE writes it (replay it with
    'onnxshrink run FILE MODEL -o OUT'), --dry-run prints it and does nothing else.

    Exit code 3 when an explicitly requested --max-drop/--min-sqnr is not met (the best
    model found is still written).
    """
    int8 = Int8Config(
        method=method,
        per_channel=not per_tensor,
        activation_type=activation_type,
        reduce_range=reduce_range,
        exclude=exclude,
        fusion_aware=not no_fusion_aware,
        max_drop=max_drop,
        min_sqnr=min_sqnr,
        provider=provider,
        max_calibration_samples=calib_count,
        seed=seed,
    )
    preprocess = ImagePreprocess(
        size=_size(image_size),
        layout=layout,
        mean=_floats(mean, "--mean") or (0.0,),
        std=_floats(std, "--std") or (1.0,),
        scale=scale,
        mode=color,
    )
    if prune_channels is not None and prune_macs is not None:
        raise ConfigError("give either --prune-channels or --prune-macs, not both")
    if prune_magnitude is not None and prune_threshold is not None:
        raise ConfigError("give either --prune-magnitude or --prune-threshold, not both")
    channels = None
    if prune_channels is not None or prune_macs is not None:
        channels = ChannelPruneConfig(
            ratio=prune_channels, target_mac_reduction=prune_macs, importance=prune_importance,
            exclude=prune_exclude, round_to=prune_round_to,
        )
    magnitude = None
    if prune_magnitude is not None or prune_threshold is not None:
        magnitude = MagnitudePruneConfig(
            sparsity=prune_magnitude, threshold=prune_threshold, scope=prune_scope,
            exclude=prune_exclude, include_first_last=prune_first_last,
        )
    options = ShrinkOptions(
        quantize=None if quantize == "none" else quantize,
        int8=int8,
        channels=channels,
        magnitude=magnitude,
        recalibrate_bn=recalibrate_bn,
        calibration=calibration,
        data_options=DataOptions(preprocess=preprocess, seed=seed, shapes=parse_shape_overrides(shapes)),
        measure_latency=not no_timing,
        threads=threads,
        progress=not as_json and sys.stderr.isatty(),
    )
    recipe = recipe_from_options(options)
    if save_recipe is not None:
        written = save_recipe_file(recipe, save_recipe)
        if not dry_run:
            click.echo(f"onnxshrink: recipe written to {written}", err=True)
    if dry_run:
        if as_json:
            echo_json(recipe.to_dict(base_dir=os.getcwd()))
        else:
            click.echo(dumps(recipe, base_dir=os.getcwd()), nl=False)
        return
    if output is None:
        raise click.UsageError("Missing option '-o' / '--output'.")
    outcome = run_recipe(recipe, model, output, progress=options.progress)
    report_outcome(outcome, as_json=as_json, output=output)


def report_outcome(outcome: ShrinkOutcome, *, as_json: bool, output: str) -> None:
    """Print the outcome (table or JSON), its warnings, and fail with exit 3 on a gate."""
    if as_json:
        echo_json(outcome.to_json())
    else:
        click.echo(render(outcome))
    for warning in outcome.warnings:
        click.echo(f"onnxshrink: warning: {warning}", err=True)
    if outcome.gate_failed:
        raise GateFailed(outcome.gate_message(), path=output)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(o: ShrinkOutcome) -> str:
    rows = [
        ("file size", human_bytes(o.size_before), human_bytes(o.size_after), f"{o.size_after / max(o.size_before, 1):.2f}x"),
        ("parameters", human_count(o.params_before), human_count(o.params_after), ""),
        ("MACs", human_count(o.macs_before), human_count(o.macs_after), ""),
    ]
    if o.latency:
        lat = o.latency
        rows.append((f"latency p50 ({lat.provider}, {lat.threads} thr)", f"{lat.baseline_p50_ms:.3f} ms", f"{lat.candidate_p50_ms:.3f} ms", f"{lat.ratio:.2f}x ({1 / lat.ratio:.2f}x faster)" if lat.ratio < 1 else f"{lat.ratio:.2f}x SLOWER"))
    lines = [f"{o.input_path} -> {o.output_path}   [{', '.join(o.steps)}]", section("Before / after"), format_table(rows, ["", "original", "compressed", "ratio"], align="lrrr")]
    for d in o.distill:
        for split in d.get("splits", []):
            before, after = split["before"], split["after"]
            lines.append(f"distill ({d['epochs_run']} epochs, best {d['best_epoch']}), {split['name']}: top-1 agreement "
                         f"{_pct(before.get('top1_agreement'))} -> {_pct(after.get('top1_agreement'))}")
    if o.fidelity is not None:
        f = o.fidelity
        rows2 = [("samples", f"{f.samples}" + (" RANDOM inputs (no accuracy meaning)" if o.fidelity_on_random else " held back")),
                 ("top-1 agreement", _pct(f.top1_agreement))]
        if f.accuracy_reference is not None:
            rows2.append(("accuracy original -> compressed", f"{_pct(f.accuracy_reference)} -> {_pct(f.accuracy_candidate)}"))
        rows2 += [("output SQNR", f"{f.sqnr_db:.1f} dB"), ("cosine", f"{f.cosine:.5f}")]
        lines += [section("End-to-end fidelity vs the original"), format_pairs(rows2)]
    for report in o.pruning:
        lines += [section("Pruning"), report.render()]
    if o.magnitude_sensitivity:
        sens = sorted(o.magnitude_sensitivity, key=lambda x: x.fidelity.sqnr_db)
        rows3 = [
            (x.weight, x.op_type, f"{x.params:,}", f"{x.fidelity.sqnr_db:.1f}", _pct(x.fidelity.top1_agreement))
            for x in sens[:12]
        ]
        lines += [
            section(f"Per-layer sensitivity to {100 * sens[0].sparsity:.0f}% magnitude pruning (each layer alone, most sensitive first)"),
            format_table(rows3, ["weight", "op", "params", "SQNR dB", "top-1 agr."], align="llrrr"),
        ]
    if o.int8:
        r = o.int8
        f = r.fidelity
        target = r.target
        if target["kind"] != "max_drop_points":
            target_text = f"SQNR >= {target['value']} dB"
        elif target.get("estimate") == "confidence_weighted":
            target_text = f"expected top-1 drop <= {target['value']} points or SQNR >= {target['or_min_sqnr_db']} dB"
        else:
            target_text = f"top-1 drop <= {target['value']} points"
        target_text += " (default)" if target.get("default") else ""
        frac = r.fusion.int8_mac_fraction
        fid_rows = [
            ("samples", f"{r.evaluation_samples} held back" if not r.evaluation_overlaps_calibration else f"{r.evaluation_samples} (= calibration set)"),
            ("top-1 agreement", _pct(f.top1_agreement)),
        ]
        if f.expected_drop_points is not None and f.accuracy_reference is None:
            fid_rows.append(("expected top-1 drop", f"{f.expected_drop_points:.2f} points (flips weighted by fp32 confidence)"))
        if f.accuracy_reference is not None:
            fid_rows.append(("accuracy fp32 -> int8", f"{_pct(f.accuracy_reference)} -> {_pct(f.accuracy_candidate)}"))
        fid_rows += [
            ("output SQNR", f"{f.sqnr_db:.1f} dB"),
            ("cosine", f"{f.cosine:.5f}"),
            ("target", f"{target_text}: {'met' if r.target_met else 'NOT MET'}"),
        ]
        lines += [section("int8 fidelity vs its fp32 input" if o.pruning else "int8 fidelity vs fp32"), format_pairs(fid_rows)]
        q_rows = [
            ("calibration", f"{r.config.method}, {r.calibration_samples} samples"),
            ("weights / activations", f"int8 {'per-channel' if r.config.per_channel else 'per-tensor'}{' (7-bit)' if r.reduce_range else ''} / {r.config.activation_type}"),
            ("nodes quantized", str(r.quantized_nodes)),
            ("int8 kernels after ORT optimisation", str(r.fusion.int8_kernels)),
            ("MACs in int8 kernels", _pct(frac)),
            ("nodes left fp32", str(len(r.fp32_nodes))),
        ]
        lines += [section("Quantization"), format_pairs(q_rows)]
        if r.fp32_nodes:
            shown = r.fp32_nodes[:15]
            lines += ["", format_table([(n.node, n.op_type, n.reason) for n in shown], ["fp32 node", "op", "why"], align="lll")]
            if len(r.fp32_nodes) > len(shown):
                lines.append(f"... and {len(r.fp32_nodes) - len(shown)} more (see --json)")
        if r.fusion.unfused:
            lines.append(f"\nFloat islands between Q/DQ: {r.fusion.summary()}")
    lines.append(f"\nconversion: {o.wall_seconds:.1f} s, peak memory {o.peak_rss_mb:.0f} MiB")
    return "\n".join(lines)
