"""The group and rate-limit rules on PostgreSQL: the same checks as the memory and SQLite
stores, with four stores (four pools, separate connections) writing at once."""

from __future__ import annotations

import pytest

from aio_workq.jobs import GroupStore, RateStore
from aio_workq.jobs.postgres import PostgresStore
from tests.test_jobs_groups_store import (
    check_group_claims,
    check_group_id_reused,
    check_token_takes,
)
from tests.test_jobs_postgres import schema  # noqa: F401 - the fixture

pytestmark = pytest.mark.postgres


async def test_postgres_store_groups_from_several_connections(
    postgres_dsn: str,
    schema: str,  # noqa: F811 - the fixture
) -> None:
    stores = [PostgresStore(postgres_dsn, schema=schema) for _ in range(4)]
    try:
        assert isinstance(stores[0], GroupStore) and isinstance(stores[0], RateStore)
        await check_group_claims(stores)
        # (by the server's clock: the waits are from each statement's time, not `now`)
        await check_token_takes(stores, slack=0.25)
        await check_group_id_reused(stores[0])
        assert await stores[0].purge() == 0
    finally:
        for store in stores:
            await store.close()
