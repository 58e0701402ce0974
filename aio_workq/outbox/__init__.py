"""Exactly-once effects on PostgreSQL: a transactional outbox and an idempotent consumer.

Needs the `postgres` extra (`pip install 'aio-workq[postgres]'`, psycopg 3). See the guide
"Exactly-once effects".
"""

from __future__ import annotations

from ._errors import OutboxConfigurationError as OutboxConfigurationError
from ._errors import OutboxError as OutboxError
from ._errors import OutboxSchemaError as OutboxSchemaError
from ._errors import UnsupportedConnectionError as UnsupportedConnectionError
from ._idempotent import IdempotentConsumer as IdempotentConsumer
from ._idempotent import TransactionalHandler as TransactionalHandler
from ._idempotent import idempotent as idempotent
from ._outbox import Outbox as Outbox
from ._relay import OutboxRelay as OutboxRelay
from ._schema import migrate as migrate
from ._schema import schema_sql as schema_sql

__all__ = [
    "idempotent",
    "IdempotentConsumer",
    "migrate",
    "Outbox",
    "OutboxConfigurationError",
    "OutboxError",
    "OutboxRelay",
    "OutboxSchemaError",
    "schema_sql",
    "TransactionalHandler",
    "UnsupportedConnectionError",
]
