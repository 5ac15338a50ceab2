"""A sensor that is noticed when it stops: a live `agent run` heartbeats to a
real `collector serve`; its kill -9 raises an agent_silent alert; an
enrollment with the fleet secret that tries to take over its id is refused
and alerted, and the real agent keeps shipping with its key."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_faults import Agent, burst, rows, wait_for
from tests.support import procs, writers

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(bool(writers.can_run()), reason=writers.can_run() or "ok"),
]


@pytest.fixture
def www() -> Iterator[writers.Writers]:
    with writers.www_tempdir("rw-health-") as base:
        yield writers.make_writers(base)


COLLECTOR_CONF = "[collector]\nagent_silent_after = 10s\nalerts_file = {alerts}\n"


def health_alerts(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [d for d in docs if d["rule"]["id"] == "rarewrite-sensor-health"]


def kinds(path: Path, agent_id: str) -> list[str]:
    return [d["rarewrite"]["health"]["kind"] for d in health_alerts(path) if d["agent"]["id"] == [agent_id]]


def enroll_with_the_secret(url: str, agent_id: str) -> int:
    body = json.dumps({"enrollment_secret": procs.SECRET, "agent_id": agent_id, "host_name": "ghost"})
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url + "/api/v1/enroll", body.encode(), headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_kill_9_is_noticed_and_a_stolen_secret_cannot_take_over(www: writers.Writers, tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.ndjson"
    conf = tmp_path / "collector.conf"
    conf.write_text(COLLECTOR_CONF.format(alerts=alerts))
    with procs.collector(str(tmp_path), "--config", str(conf)) as col:
        agent = Agent(tmp_path, col.url, str(tmp_path / "state"), www.base)
        agent.conf.write_text(agent.conf.read_text() + "heartbeat_interval = 1s\n")
        agent.start()
        agent_id = agent.status()["agent_id"]

        def health() -> Any:
            r = procs.run(["collector", "agents", "list", "--db", col.db])
            return next(json.loads(line)["health"] for line in r.stdout.splitlines())

        beat = wait_for("a heartbeat stored", health, timeout=20)
        assert beat["status"] == "ok" and beat["counters"]["ship_heartbeats"] >= 0
        assert "agent_enrolled" in kinds(alerts, agent_id)

        # someone with the fleet secret tries to become this agent: refused, alerted
        assert enroll_with_the_secret(col.url, agent_id) == 409
        wait_for("a refusal alert", lambda: "agent_reenroll_refused" in kinds(alerts, agent_id))
        want = burst(www, "after-ghost", n=3)
        wait_for("the real agent's rows", lambda: want <= rows(col.db), timeout=30)

        # kill -9: no goodbye, only silence
        killed = time.monotonic()
        agent.kill(signal.SIGKILL)
        wait_for("an agent_silent alert", lambda: "agent_silent" in kinds(alerts, agent_id), timeout=40)
        noticed = time.monotonic() - killed
        (silent,) = [d for d in health_alerts(alerts) if d["rarewrite"]["health"]["kind"] == "agent_silent"]
        assert silent["kibana"]["alert"]["severity"] == "high" and silent["event"]["kind"] == "signal"
        assert noticed < 35, noticed  # 10 s of silence, checked every 2.5 s, plus a heartbeat's age
        assert "event=health_alert" in col.log_text()
    assert os.path.exists(col.db)
