"""Errors of the admin operations (the CLI's and the dashboard's): each message says what to do."""

from __future__ import annotations

from aio_workq import WorkqError

__all__ = ("AdminError", "ManagementAPIError")


class AdminError(WorkqError):
    """An admin operation could not do what was asked; the message says why and what to do."""


class ManagementAPIError(AdminError):
    """The RabbitMQ management HTTP API is not reachable or refused the request."""
