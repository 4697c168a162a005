"""``onnxshrink bench``: compare models' latency, size, memory and accuracy; gate on them."""

from __future__ import annotations

import click

from onnxshrink.cli._options import MODEL_PATH, echo_json, json_option, shape_option
from onnxshrink.errors import ConfigError, GateFailed
from onnxshrink.stats import parse_shape_overrides

_POSITIVE = click.FloatRange(min=0, min_open=True)


def _parse_provider_options(items: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--provider-option '{item}': expected KEY=VALUE, e.g. device_id=0")
        options[key.strip()] = value.strip()
    return options


def _list_providers(as_json: bool) -> None:
    import onnxruntime as ort

    from onnxshrink.runtime import PROVIDERS, available_providers

    available = available_providers()
    if as_json:
        echo_json({"onnxruntime": ort.__version__, "available": available, "short_names": PROVIDERS})
        return
    click.echo(f"Execution providers of onnxruntime {ort.__version__} (use --provider NAME):")
    short = {v: k for k, v in PROVIDERS.items()}
    for full in sorted(set(available) | set(PROVIDERS.values()), key=lambda p: (p not in available, p)):
        state = "available" if full in available else "not in this build"
        click.echo(f"  {short.get(full, '-'):<9} {full:<28} {state}")


@click.command()
@click.argument("models", nargs=-1, type=MODEL_PATH, metavar="BASELINE [CANDIDATE]...")
@click.option("--provider", default="cpu", show_default=True, metavar="NAME",
              help="Execution provider: cpu, cuda, tensorrt, openvino, dml, coreml, rocm, migraphx, qnn, xnnpack "
              "or a full onnxruntime name. A provider this onnxruntime lacks is an error (exit 2), never a silent CPU run.")  # fmt: skip
@click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
              help="Option passed to the provider as is, e.g. device_id=0 (repeatable).")  # fmt: skip
@click.option("--list-providers", is_flag=True, help="List the providers this onnxruntime offers and exit.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Intra-op threads per session; 0 lets onnxruntime choose.")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Rows per run.")
@shape_option
@click.option(
    "--runs",
    type=click.IntRange(min=3),
    default=100,
    show_default=True,
    help="Timed rounds, at least (each runs every model once).",
)
@click.option(
    "--min-time",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Keep timing past --runs until this much time has passed (fast models need it; 0: exactly --runs).",
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed rounds first."
)
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Samples: .npz (model input names as keys, optional 'labels'), a folder of .npz, or an image folder "
              "with one sub-folder per class. Without it, seeded random inputs (fidelity on noise, no accuracy).")  # fmt: skip
@json_option
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also write DIR/report.html (self-contained, with charts) and DIR/bench.json.")  # fmt: skip
@click.option(
    "--min-speedup",
    type=_POSITIVE,
    default=None,
    metavar="X",
    help="Gate: p50 baseline / p50 candidate >= X.",
)
@click.option("--max-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Gate: top-1 accuracy drop in points (with labels), else 100 x (1 - agreement) <= POINTS.")  # fmt: skip
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None, metavar="F",
              help="Gate: top-1 agreement with the baseline >= F (0..1).")  # fmt: skip
@click.option(
    "--max-size",
    type=_POSITIVE,
    default=None,
    metavar="MB",
    help="Gate: candidate file size (+ external data) <= MB (10^6 bytes).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of random inputs and of the bootstrap interval.",
)
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probe (one child process per model).")
@click.option(
    "--no-profile", is_flag=True, help="Skip the profiler pass (time by op type, provider placement)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def bench(
    ctx: click.Context,
    models: tuple[str, ...],
    provider: str,
    provider_options: tuple[str, ...],
    list_providers: bool,
    threads: int,
    batch: int,
    shapes: tuple[str, ...],
    runs: int,
    min_time: float,
    warmup: int,
    data: str | None,
    as_json: bool,
    report_dir: str | None,
    min_speedup: float | None,
    max_drop: float | None,
    min_agreement: float | None,
    max_size: float | None,
    seed: int,
    no_memory: bool,
    no_profile: bool,
    quiet: bool,
) -> None:
    """Benchmark BASELINE against CANDIDATE models: latency, size, memory, accuracy, gates.

    \b
    The models run interleaved in one process (A B A B ..., order alternating each round),
    so their latency ratio holds on a noisy machine. Reported per model: p50/p90/p99, mean
    and min latency, throughput (batch / p50), session creation time, peak RSS growth of
    the session (own child process per model), size on disk, kernel time by op type (from
    onnxruntime's profiler, separate pass) and, on GPU providers, nodes that ran on CPU.
    Candidates get the ratio p50 candidate / p50 baseline with a 95% paired-bootstrap
    interval, and fidelity against the baseline: top-1 agreement, SQNR, cosine; with
    labelled --data also top-1/top-5 accuracy per model.

    \b
    Gates (every candidate; exit code 3 if one fails, after all output is written):
      --min-speedup X  --max-drop POINTS  --min-agreement F  --max-size MB

    \b
    Examples:
      onnxshrink bench model.onnx model.int8.onnx --data eval.npz --report out/
      onnxshrink bench fp32.onnx int8.onnx --min-speedup 1.5 --max-drop 1 --json
      onnxshrink bench --list-providers
    """
    if list_providers:
        _list_providers(as_json)
        return
    if not models:
        raise click.UsageError("give the baseline model and one or more candidates (or --list-providers)")
    from onnxshrink.bench.core import BenchConfig, run_bench
    from onnxshrink.bench.gates import GateSpec
    from onnxshrink.bench.html import write_report
    from onnxshrink.bench.text import render

    root_quiet = bool(ctx.find_root().params.get("quiet"))
    config = BenchConfig(
        provider=provider,
        provider_options=_parse_provider_options(provider_options),
        threads=threads,
        batch=batch,
        shapes=parse_shape_overrides(shapes),
        runs=runs,
        min_time=min_time,
        warmup=warmup,
        data=data,
        seed=seed,
        gates=GateSpec(
            min_speedup=min_speedup, max_drop=max_drop, min_agreement=min_agreement, max_size_mb=max_size
        ),
        memory=not no_memory,
        profile=not no_profile,
        progress=not (quiet or root_quiet),
    )
    payload = run_bench(list(models), config)
    if report_dir is not None:
        paths = write_report(payload, report_dir)
    if as_json:
        echo_json(payload)
    else:
        click.echo(render(payload))
        if report_dir is not None:
            click.echo(f"\nReport: {paths['html']}")
    if not payload["passed"]:
        failed = [f"{g['name']} ({g['model']})" for g in payload["gates"] if not g["passed"]]
        raise GateFailed(f"{len(failed)} of {len(payload['gates'])} gates failed: {', '.join(failed)}")
