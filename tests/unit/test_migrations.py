"""One migration shape for the three schemas: each list ascends and ends at
its schema's version, and pending() gives exactly the steps still needed."""

from __future__ import annotations

import pytest

from agent.collector.storage import postgres, sqlite
from agent.sensor import outbox
from agent.shared.migrations import Migration, pending


@pytest.mark.parametrize("module", [outbox, sqlite, postgres], ids=["agent", "sqlite", "postgres"])
def test_each_schema_ends_at_its_version(module: object) -> None:
    migrations = module.MIGRATIONS  # type: ignore[attr-defined]
    assert all(isinstance(m, Migration) for m in migrations)
    assert migrations[-1].version == module.SCHEMA_VERSION  # type: ignore[attr-defined]
    assert pending(migrations, module.SCHEMA_VERSION) == []  # type: ignore[attr-defined]


def test_pending_keeps_order_and_skips_what_was_applied() -> None:
    steps = [Migration(v, f"v{v}", lambda c: None) for v in (1, 2, 3)]
    assert [m.version for m in pending(steps, 0)] == [1, 2, 3]
    assert [m.version for m in pending(steps, 2)] == [3]


def test_out_of_order_versions_are_a_bug_not_a_silent_skip() -> None:
    with pytest.raises(ValueError, match="ascend"):
        pending([Migration(2, "b", lambda c: None), Migration(1, "a", lambda c: None)], 0)
