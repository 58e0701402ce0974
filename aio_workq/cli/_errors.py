"""Errors of the command line; each is shown as one line on stderr with a non-zero exit."""

from __future__ import annotations

from aio_workq import ConfigurationError, WorkqError

__all__ = ("CliError", "ManagementAPIError", "TargetError")


class CliError(WorkqError):
    """A command could not do what was asked; the message says why and what to do."""


class TargetError(CliError, ConfigurationError):
    """`MODULE:ATTR` does not import, or is not a Worker, a list of them, a factory or a handler."""


class ManagementAPIError(CliError):
    """The RabbitMQ management HTTP API is not reachable or refused the request."""
