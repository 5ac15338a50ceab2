"""The one shape of a schema migration, for the agent's state file and both
collector stores: ``Migration(version, description, step)``, where ``step``
takes a database from ``version - 1`` to ``version`` on the connection it is
given, inside the caller's transaction. Append only: a released step never
changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

C = TypeVar("C")


@dataclass(frozen=True)
class Migration(Generic[C]):
    version: int
    description: str
    step: Callable[[C], Any]


def pending(migrations: Sequence[Migration[C]], current: int) -> list[Migration[C]]:
    """The steps a database at schema ``current`` still needs, in order."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must ascend without repeats: {versions}")
    return [m for m in migrations if m.version > current]
