"""``onnxshrink recipe validate|show|steps``: check and explain recipe files."""

from __future__ import annotations

import dataclasses
import inspect as _inspect
from pathlib import Path

import click

from onnxshrink.cli._options import echo_json, json_option
from onnxshrink.recipe import STEP_TYPES, dumps, load_recipe, step_options
from onnxshrink.recipe._codec import field_hints


@click.group(name="recipe")
def recipe_group() -> None:
    """Check and explain recipe files (run them with 'onnxshrink run')."""


@recipe_group.command(name="validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
def validate(files: tuple[str, ...]) -> None:
    """Check each recipe FILE: version, step types, option names, types and values, order.

    Prints one line per valid file; the first invalid one is a one-line error (exit 2).
    """
    for name in files:
        recipe = load_recipe(name)
        click.echo(f"{name}: valid (version {recipe.version}): {recipe.summary()}")


@recipe_group.command(name="show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@json_option
def show(file: str, as_json: bool) -> None:
    """Print FILE with every option spelled out (defaults included), as 'run' reads it."""
    recipe = load_recipe(file)
    base = Path(file).resolve().parent
    if as_json:
        echo_json(recipe.to_dict(base_dir=base))
    else:
        click.echo(dumps(recipe, base_dir=base), nl=False)


@recipe_group.command(name="steps")
def steps() -> None:
    """List the step types and their options with defaults."""
    for kind, cls in STEP_TYPES.items():
        doc = _inspect.getdoc(cls) or ""
        click.echo(f"{kind}: {' '.join(doc.split(chr(10) + chr(10))[0].split())}")
        inner = getattr(cls, "inner", None)
        defaults = {}
        for owner in ([inner] if inner else []) + [cls]:
            for f in dataclasses.fields(owner):
                if f.name == "config":
                    continue
                if f.default is not dataclasses.MISSING:
                    defaults[f.name] = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    defaults[f.name] = f.default_factory()
                else:
                    defaults[f.name] = "(required)"
        hints = {**(field_hints(inner) if inner else {}), **field_hints(cls)}
        for name in step_options(cls):
            hint = str(hints[name]).replace("typing.", "").replace("collections.abc.", "")
            click.echo(f"    {name}: {defaults.get(name)!r}   [{hint}]")
