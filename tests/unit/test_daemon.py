"""Daemon pieces that need no kernel: status liveness, coverage gaps."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.sensor.outbox import AgentStore
from agent.sensor.runtime import LiveAgent
from agent.sensor.state_dir import StateDir, read_status
from agent.shared import wire
from agent.shared.clock import FakeClock
from agent.shared.config.schema import Config
from agent.shared.rule import Rule


def test_status_says_stopped_without_the_lock_holder(tmp_path: Path) -> None:
    state = StateDir(str(tmp_path))
    state.write_status({"state": "running", "pid": 1})
    code, doc = read_status(str(tmp_path))  # nobody holds agent.lock
    assert code == 3 and doc["state"] == "stopped" and doc["last_state"] == "running"
    state.lock()
    code, doc = read_status(str(tmp_path))
    assert code == 0 and doc["state"] == "running"


def test_identity_is_made_once_and_can_be_forced(tmp_path: Path) -> None:
    state = StateDir(str(tmp_path))
    first = state.identity()
    assert state.identity().agent_id == first.agent_id
    assert state.identity("forced-id", "h").agent_id == "forced-id"
    assert json.loads((tmp_path / "identity.json").read_text())["agent_id"] == "forced-id"
    assert (os.stat(tmp_path / "identity.json").st_mode & 0o777) == 0o600


class FakeSource:
    name = "fake"

    def __init__(self) -> None:
        self.unresolved = 0
        self.refused: list[dict[str, str]] = []

    def stats(self) -> dict[str, Any]:
        return {"unresolved": self.unresolved, "refused": self.refused}


def test_unresolved_handles_and_refused_filesystems_become_gaps(tmp_path: Path) -> None:
    clock = FakeClock()
    store = AgentStore(str(tmp_path / "a.db"), Rule(), clock)
    agent = LiveAgent(Config(), "secret", clock=clock)
    src = FakeSource()
    agent._report_coverage(src.stats(), store)
    assert store.depth() == 0
    src.unresolved, src.refused = 3, [{"path": "/mnt/nfs", "reason": "EXDEV"}]
    clock.advance(1)
    agent._report_coverage(src.stats(), store)
    agent._report_coverage(src.stats(), store)  # nothing new: nothing more
    lease = store.lease("a", "h", 100)
    assert lease is not None
    gaps = wire.decode_batch(lease.body).gaps
    assert sorted((g.reason, g.lost) for g in gaps) == [("unmarked_filesystem", 0), ("unresolved_handle", 3)]
