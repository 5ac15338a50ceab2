"""Shared fixtures: a throwaway PostgreSQL server for the tests that need one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import pg

_failed: list[str] = []


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.Server]:
    """One PostgreSQL cluster for the session (installed with apt-get if
    missing and root); tests that use it skip, with the reason, only when no
    server can be had here."""
    if _failed:
        pytest.skip(_failed[0])
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _failed.append("psycopg is not installed (pip install 'rarewrite[postgres]')")
        pytest.skip(_failed[0])
    try:
        server = pg.start()
    except pg.Unavailable as e:
        _failed.append(f"no PostgreSQL: {e}")
        pytest.skip(_failed[0])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: pg.Server) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    name = pg_server.create_db()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_db(name)
