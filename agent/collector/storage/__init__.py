"""Collector storage: SQLite by default (:mod:`.sqlite`), PostgreSQL for
several collectors (:mod:`.postgres`); :func:`open_store` picks by name."""

from __future__ import annotations

from typing import Any

from agent.collector.storage.base import Store
from agent.collector.storage.sqlite import SCHEMA_VERSION, CollectorStore, sqlite_version
from agent.shared.text import is_postgres, redact


def open_store(db: str, readonly: bool = False) -> Store:
    """PostgreSQL for a ``postgresql://`` or ``postgres://`` URL, else the SQLite file ``db``.

    Opening for writing runs the schema migrations (PostgreSQL: under an
    advisory lock, so several collectors may start at once)."""
    if is_postgres(db):
        from agent.collector.storage.postgres import PgStore

        return PgStore(db, readonly=readonly)
    return CollectorStore(db, readonly=readonly)


def migrate(db: str) -> dict[str, Any]:
    """``rarewrite collector migrate``: bring ``db`` to this rarewrite's schema version."""
    if is_postgres(db):
        from agent.collector.storage.postgres import migrate_url

        before, after = migrate_url(db)
    else:
        before = sqlite_version(db)
        CollectorStore(db).close()
        after = SCHEMA_VERSION
    return {
        "db": redact(db),
        "backend": "postgresql" if is_postgres(db) else "sqlite",
        "from": before,
        "to": after,
    }
