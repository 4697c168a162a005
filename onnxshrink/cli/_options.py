"""Option types and decorators shared by several commands."""

from __future__ import annotations

import json
from typing import Any

import click

#: Model arguments: existence and type are checked by modelio (one message format for all).
MODEL_PATH = click.Path(dir_okay=True, path_type=str)

shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="Fix an input's shape, e.g. --shape input=1x3x224x224 (repeatable). "
    "Needed for inputs with dynamic dimensions other than the batch, which defaults to 1.",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout instead of tables.")


def echo_json(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False))
