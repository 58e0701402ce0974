"""Errors of the command line; each is shown as one line on stderr with a non-zero exit."""

from __future__ import annotations

from aio_workq import ConfigurationError
from aio_workq.admin import AdminError
from aio_workq.admin import ManagementAPIError as ManagementAPIError

__all__ = ("CliError", "ManagementAPIError", "TargetError")


class CliError(AdminError):
    """A command could not do what was asked; the message says why and what to do."""


class TargetError(CliError, ConfigurationError):
    """`MODULE:ATTR` does not import, or is not a Worker, a list of them, a factory or a handler."""
