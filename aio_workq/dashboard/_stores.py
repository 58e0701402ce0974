"""The job store a URL names, for `aio-workq dashboard --store URL` (kept in `aio_workq.jobs`,
which `aio-workq job` uses without the dashboard's extra)."""

from __future__ import annotations

from aio_workq.jobs._from_url import store_from_url as store_from_url

__all__ = ("store_from_url",)
