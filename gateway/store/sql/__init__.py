"""The registry's SQL, written once for every engine: one module per aggregate.

How it is put together: each aggregate's statements and the methods that run them are a
part (UsersSQL, KeysSQL, AppsSQL, DeploysSQL, QueueSQL, HomesSQL, AuditSQL, TokensSQL), each
a mixin of SQLBase, which says what they need from a driver: `fetch` and `execute` (rows
come back as mappings by column name), `_transaction`, and the few things engines do their own way
(`notify`, `lock_claims`, `raise_id_mark`). SQLStore is the facade composing the parts; a
driver (gateway/store/sqlite.py, gateway/store/postgres/) subclasses it with its
connection handling, migrations and `dialect` (gateway/store/sql/dialect.py: placeholders,
collation, arrays, JSON, row locks, the leases' clock). Rows become records by column name
(gateway/store/sql/rows.py), and a SELECT list is made from the model's fields: a new
column of deploys is a field of Deploy, a migration per engine, and nothing here.
"""

from __future__ import annotations

from .apps import AppsSQL
from .audit import AuditSQL
from .base import ForeignKeyViolation, Row, SQLBase, UniqueViolation
from .dialect import POSTGRES, SQLITE, Dialect
from .homes import HomesSQL
from .keys import KeysSQL
from .queue import QueueSQL
from .tokens import TokensSQL
from .users import UsersSQL


class SQLStore(UsersSQL, KeysSQL, AppsSQL, QueueSQL, HomesSQL, AuditSQL, TokensSQL):
    """Every aggregate's part in one Store; a driver adds how statements run."""


__all__ = [
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "ForeignKeyViolation",
    "Row",
    "SQLBase",
    "SQLStore",
    "UniqueViolation",
]
