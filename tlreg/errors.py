"""The user-facing error families (and sharing's one warning), in one home.

The CLI turns each `TlregError` into one clear line and its `exit_code`. Keeping them at the
bottom layer lets any module raise or catch them without importing the module that usually
raises them (the CLI, tests and a Hub client need not import torch to name an error).
"""

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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: the part of a library's error a user needs."""
    return (str(exc).strip().splitlines() or [""])[0]


class PluginError(TlregError):
    """A plugin failed to load or gave an object of the wrong type."""


class WeightsError(TlregError):
    """Pretrained weights could not be loaded or do not match."""


# -- sharing: artifacts ---------------------------------------------------------------------


class ArtifactError(TlregError):
    """An artifact is malformed, tampered with, unsafe or does not fit this installation."""

    exit_code = 6


class FormatVersionError(ArtifactError):
    """config.json is from a format version this tlreg does not know."""


class ChecksumError(ArtifactError):
    """A file's SHA-256 differs from the one config.json records."""


class UnsafeFileError(ArtifactError):
    """The artifact holds pickle files, which tlreg never loads."""


class UnsafeUploadError(ArtifactError):
    """The artifact would publish a token or a local path."""


class BackboneUnavailableError(ArtifactError):
    """The backbone the artifact names is not installed here."""


class BackboneMismatchError(ArtifactError):
    """The pretrained weights here are not the ones the head was trained on."""


class BackboneMismatchWarning(UserWarning):
    """Loaded despite a backbone weights mismatch (allow_backbone_mismatch=True)."""


# -- sharing: the Hub (one exit code per cause, see docs/hub.md) ------------------------------


class HubError(TlregError):
    """The Hub refused or failed a request."""

    exit_code = 1


class HubAuthError(HubError):
    """401/403: no token, a rejected token, or one without access."""

    exit_code = 3


class HubNotFoundError(HubError):
    """404: the repo, the revision or a file does not exist (or is private)."""

    exit_code = 4


class HubConnectionError(HubError):
    """The Hub could not be reached (network down, offline mode) and nothing usable is cached."""

    exit_code = 5
