"""The errors a user can cause, and the exit code each one maps to.

Library code raises these; the CLI turns them into one line on stderr,
``onnxshrink: error: <path>: <problem>``, and the matching exit code.
Anything that is not a :class:`ShrinkError` is a bug in onnxshrink and exits
with :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import os

#: Exit codes (documented in the README; stable).
EXIT_OK = 0
EXIT_BAD_INPUT = 1  # bad, unsafe or unsupported input; a step that cannot be done
EXIT_USAGE = 2  # bad flags or arguments (click's own convention)
EXIT_GATE = 3  # a quality gate (accuracy, speed, size) failed; the report is still written
EXIT_INTERNAL = 4  # a bug in onnxshrink: please report it
EXIT_INTERRUPTED = 130  # Ctrl-C


class ShrinkError(Exception):
    """Base class of every error the user can cause or act on.

    Args:
        message: what is wrong, as one sentence without a trailing period.
        path: the file the problem is about, if any; it prefixes the message.
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def one_line(self) -> str:
        """The message as the CLI prints it, guaranteed to be a single line."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        return " ".join(text.split())


class ModelLoadError(ShrinkError):
    """The model file is missing, malformed, or not a model we support."""


class UnsafeModelError(ModelLoadError):
    """The model tries to reach outside its folder or declares absurd sizes."""


class UnsupportedModelError(ModelLoadError):
    """A well-formed model that uses something we do not handle (opset, op, type)."""


class ModelSaveError(ShrinkError):
    """The output could not be written; any previous output is left as it was."""


class DataError(ShrinkError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class ConfigError(ShrinkError):
    """An option or recipe value is invalid."""

    exit_code = EXIT_USAGE


class GateFailed(ShrinkError):
    """A quality gate failed (accuracy drop, speed-up, size)."""

    exit_code = EXIT_GATE
