"""``onnxshrink inspect``: describe a model."""

from __future__ import annotations

import click

from onnxshrink.cli._options import MODEL_PATH, echo_json, json_option, shape_option
from onnxshrink.modelio import load_model
from onnxshrink.report import format_shape, format_table, human_bytes, human_count, section
from onnxshrink.stats import ModelSummary, parse_shape_overrides, summarize


@click.command()
@click.argument("model", type=MODEL_PATH)
@shape_option
@json_option
def inspect(model: str, shapes: tuple[str, ...], as_json: bool) -> None:
    """Describe MODEL: versions, inputs/outputs, ops, parameters, size and MACs.

    \b
    MACs are counted for Conv/ConvTranspose/Gemm/MatMul (and quantized forms) at the given
    input shapes; a symbolic batch dimension counts as 1. FLOPs = 2 x MACs.

    \b
    Example:
      onnxshrink inspect model.onnx --shape input=1x3x224x224 --json
    """
    overrides = parse_shape_overrides(shapes)
    proto, info = load_model(model, load_weights=False)
    summary = summarize(proto, info, shapes=overrides)
    if as_json:
        echo_json(summary.to_json())
    else:
        click.echo(render(summary))


def render(s: ModelSummary) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in s.opsets.items())
    producer = f"{s.producer} {s.producer_version}".strip() or "-"
    lines = [
        f"Model      {s.path}",
        f"Producer   {producer}",
        f"IR / opset {s.ir_version} / {opsets}",
        f"Size       {human_bytes(s.file_bytes)} model file"
        + (f" + {human_bytes(s.external_data_bytes)} external data" if s.external_data_bytes else ""),
        f"Parameters {human_count(s.parameters)} ({s.parameters:,})",
        f"Nodes      {s.node_count}",
    ]
    if s.macs.total is not None:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in s.macs.input_shapes.items())
        lines.append(f"MACs       {human_count(s.macs.total)} ({s.macs.total:,}) at {shapes}; FLOPs {human_count(2 * s.macs.total)}")
    else:
        lines.append("MACs       unknown: give concrete shapes with --shape NAME=DIMS")
    io_rows = [("input", t.name, t.dtype, format_shape(t.shape)) for t in s.inputs]
    io_rows += [("output", t.name, t.dtype, format_shape(t.shape)) for t in s.outputs]
    lines += [section("Inputs and outputs"), format_table(io_rows, ["", "name", "type", "shape"])]
    op_rows = [
        (op, count, human_count(s.macs.by_op_type.get(op)) if op in s.macs.by_op_type else "")
        for op, count in s.op_types.items()
    ]
    lines += [section("Operators"), format_table(op_rows, ["op type", "count", "MACs"], align="lrr")]
    return "\n".join(lines)
