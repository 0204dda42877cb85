"""The error hierarchy: every failure a user can cause has a class and a one-line message."""
from __future__ import annotations


class VitrineError(Exception):
    """Base class. The message is shown to users as one line, so it names the bad value and the fix."""


class ConfigError(VitrineError, ValueError):
    """A configuration value is invalid (the message echoes it and says what is valid)."""


class SchemaError(VitrineError, ValueError):
    """An input file does not follow the documented schema (missing columns, wrong types, bad format)."""


class ModelUnavailableError(VitrineError):
    """Model weights or the package that carries them are missing; never replaced by random weights."""


class StoreError(VitrineError):
    """The vector store refused an operation."""


class StoreUnavailableError(StoreError):
    """The vector store cannot be reached (server down, wrong URI)."""


class CollectionMismatchError(StoreError):
    """A collection holds vectors of another model or dimension than the caller's."""


class FilterError(StoreError, ValueError):
    """A filter expression is not valid for the collection."""


class NotFoundError(VitrineError, KeyError):
    """An item, user or collection does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EmptyProfileError(VitrineError, ValueError):
    """A user has no event that says anything about their taste (or their likes and dislikes cancel out)."""


class TrainingFailedError(VitrineError):
    """A training job did not finish: Ray Train gave up after ``max_failures`` restarts (the cause is chained)."""


def first_line(e: BaseException) -> str:
    """An exception's first line, bounded, for a one-line message (its type when it has no message)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
