"""Errors that reach users as one line: the file and the problem."""

from __future__ import annotations

from pathlib import Path


class StrokeSegError(Exception):
    """Base class of every error the command line turns into a one-line message (exit code 2)."""


class InputError(StrokeSegError):
    """An input file (or folder) cannot be used; the message names it and says why."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # so the error crosses process pools intact (batch workers, data generation)
        return (type(self), (self.path, self.problem))


class ModelError(StrokeSegError):
    """A bundled or user model cannot be loaded safely (unknown, tampered, unsafe format)."""


class OutputError(StrokeSegError):
    """An output location cannot be written."""


class Cancelled(StrokeSegError):
    """The user cancelled a running job (Cancel button, Ctrl-C)."""
