"""The ``onnxshrink`` command line: a click group, and the error handling every command shares.

Every error a user can cause prints exactly one line, ``onnxshrink: error: <path>: <problem>``,
on stderr and exits with a documented code (see :mod:`onnxshrink.errors`). Pass
``--traceback`` (or set ``ONNXSHRINK_TRACEBACK=1``) to see the full Python trace instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence

import click

from onnxshrink import __version__
from onnxshrink.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, ShrinkError

PROG = "onnxshrink"


class _OneLineHandler(logging.Handler):
    """Log records as ``onnxshrink: warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        click.echo(f"{PROG}: {level}: {record.getMessage()}", err=True)


def _configure_logging(verbose: int, quiet: int) -> None:
    level = logging.WARNING + 10 * (quiet - verbose)
    root = logging.getLogger("onnxshrink")
    root.handlers[:] = [_OneLineHandler()]
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False


#: Each command's module, imported only when that command runs (or ``--help`` lists them all):
#: ``onnxshrink shrink`` does not import the bench, auto and distill code.
_COMMANDS = {
    "inspect": ("onnxshrink.cli.inspect_cmd", "inspect"),
    "shrink": ("onnxshrink.cli.shrink_cmd", "shrink_command"),
    "bench": ("onnxshrink.cli.bench_cmd", "bench"),
    "distill": ("onnxshrink.cli.distill_cmd", "distill"),
    "run": ("onnxshrink.cli.run_cmd", "run_command"),
    "recipe": ("onnxshrink.cli.recipe_cmd", "recipe_group"),
    "auto": ("onnxshrink.cli.auto_cmd", "auto_command"),
}


class _LazyGroup(click.Group):
    """A group whose commands are imported on first use (start-up time of every run)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(dict.fromkeys([*_COMMANDS, *super().list_commands(ctx)]))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            import importlib

            module, attribute = _COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attribute), name=cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (repeat for debug output).")
@click.option("-q", "--quiet", count=True, help="Less output: warnings off (repeat to hide errors' context too).")
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    envvar="ONNXSHRINK_TRACEBACK",
    help="On error, print the full Python traceback (also: ONNXSHRINK_TRACEBACK=1).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int, show_traceback: bool) -> None:
    """onnxshrink: make trained ONNX models smaller and faster, and prove it by measurement.

    \b
    Commands take ONNX files from any exporter (PyTorch, tf2onnx, PaddlePaddle, ...).
    Input models are never modified; outputs are written atomically.

    \b
    Exit codes: 0 success, 1 bad or unsafe input (or a step that could not be done),
    2 bad usage, 3 a quality gate failed (report still written), 4 internal error.
    """
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = show_traceback
    _configure_logging(verbose, quiet)


def _wants_traceback(argv: Sequence[str]) -> bool:
    return "--traceback" in argv or os.environ.get("ONNXSHRINK_TRACEBACK", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console-script entry point)."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cli.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{PROG}: error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo(f"{PROG}: error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        message = " ".join(exc.format_message().split())
        click.echo(f"{PROG}: error: {message}{where}", err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except ShrinkError as exc:
        if _wants_traceback(args):
            traceback.print_exc()
        click.echo(f"{PROG}: error: {exc.one_line()}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, distinct code
        if _wants_traceback(args):
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:300]
        click.echo(
            f"{PROG}: error: internal error: {type(exc).__name__}: {detail} "
            "(please report it; rerun with --traceback for details)",
            err=True,
        )
        return EXIT_INTERNAL
    return 0


def run() -> None:
    """The console script: a file-size limit (ulimit -f) makes writes fail with an error we
    report in one line, instead of the default SIGXFSZ killing the process mid-save."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.exit(main())
