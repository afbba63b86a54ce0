"""Exceptions the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class TlregError(Exception):
    """Base class: a user-facing error whose message says what to do."""

    exit_code = 1


class UsageError(TlregError, ValueError):
    """Bad input from the user (a name, an option, a data folder)."""

    exit_code = 2


class UnknownNameError(UsageError, KeyError):
    """A backbone, head or policy name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(TlregError):
    """A plugin failed to load or gave an object of the wrong type."""


class WeightsError(TlregError):
    """Pretrained weights could not be loaded or do not match."""
