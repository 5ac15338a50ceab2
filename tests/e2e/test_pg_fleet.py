"""The fleet pipeline on PostgreSQL with two collectors on one database.

Two real `collector serve --db postgresql://...` processes, agents replayed
through both (each agent's batches split between them), batches resent to
the other collector, then `collector evaluate --db postgresql://...` compared
with the independent SQL answer (tests/support/fleet.oracle_rows). The
password is only in PGPASSWORD, never on a command line or in a log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.collector.storage.postgres import SCHEMA_VERSION
from agent.shared import wire
from agent.shared.rule import Rule
from tests.e2e.test_fleet_pipeline import _sent_batches
from tests.support import fleet, pg, procs


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Pair:
    db: str  # URL without the password
    a: procs.Collector
    b: procs.Collector
    password: str


@pytest.fixture
def db(pg_server: pg.Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = pg_server.create_db("fleet")
    monkeypatch.setenv("PGPASSWORD", pg_server.password)
    try:
        yield pg_server.url(name, with_password=False)
    finally:
        pg_server.drop_db(name)


@pytest.fixture
def two(db: str, pg_server: pg.Server, tmp_path: Path) -> Iterator[Pair]:
    r = procs.run(["collector", "migrate", "--db", db])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"backend": "postgresql", "db": db, "from": 0, "to": SCHEMA_VERSION}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with procs.collector(str(tmp_path / "a"), db=db) as a, procs.collector(str(tmp_path / "b"), db=db) as b:
        yield Pair(db, a, b, pg_server.password)
    for c in (a, b):
        assert pg_server.password not in c.log_text()


def _halves(f: fleet.Fleet, folder: Path) -> list[tuple[str, str]]:
    """Each agent's documents split in two files (first and second half)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, docs in enumerate(f.docs):
        half = len(docs) // 2
        names = []
        for part, chunk in (("1", docs[:half]), ("2", docs[half:])):
            p = folder / f"agent-{i}-{part}.ndjson"
            p.write_text("".join(json.dumps(d) + "\n" for d in chunk))
            names.append(str(p))
        out.append((names[0], names[1]))
    return out


def _replay_split(f: fleet.Fleet, tmp: Path, two: Pair) -> None:
    """Agent i sends its first half to one collector and, same state (epoch,
    seq, rolling hour), its second half to the other."""
    for i, (first, second) in enumerate(_halves(f, tmp / "fleet")):
        state = str(tmp / f"state-{i}")
        order = (two.a, two.b) if i % 2 == 0 else (two.b, two.a)
        for path, c in zip((first, second), order):
            r = procs.replay(path, c.url, state, f.agents[i], f.hosts[i])
            assert r.returncode == 0, r.stderr[-2000:]


def _rows(db: str, at_ms: int) -> set[tuple[Any, ...]]:
    got = procs.evaluate(db, at_ms)
    assert [r["cc"] for r in got] == sorted(r["cc"] for r in got)
    return {fleet.row_tuple(r) for r in got}


@pytest.mark.parametrize("seed", [3, 17])
def test_generated_fleet_split_over_two_collectors_equals_the_query(
    seed: int, two: Pair, tmp_path: Path
) -> None:
    f = fleet.generate(seed, n_agents=3 + seed % 3, n_pairs=60, noise=60, at_ms=now_ms())
    _replay_split(f, tmp_path, two)
    assert _rows(two.db, f.at_ms) == fleet.oracle_rows(f)
    earlier = f.at_ms - 20 * 60_000
    assert _rows(two.db, earlier) == fleet.oracle_rows(f, earlier)
    # Agent 0's (epoch, seq) names under new batch ids, to both collectors: 409, nothing changes.
    key = json.loads((tmp_path / "state-0" / "api_key").read_text())["api_key"]
    for body in _sent_batches(tmp_path / "state-0"):
        for c in (two.a, two.b):
            resp = requests.post(
                c.url + "/api/v1/batches",
                data=body,
                timeout=10,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"},
            )
            assert resp.status_code == 409 and "new epoch" in resp.text, resp.text
    assert _rows(two.db, f.at_ms) == fleet.oracle_rows(f)


def test_shared_scenario_split_over_two_collectors(two: Pair, tmp_path: Path) -> None:
    scenarios = Path(__file__).resolve().parents[3] / "shared" / "scenarios"
    folders = sorted(scenarios.glob("seed-*")) if scenarios.exists() else []
    if not folders:
        pytest.skip("no shared scenarios on this machine")
    from agent.shared.text import parse_timestamp

    folder = folders[0]
    meta = json.loads((folder / "meta.json").read_text())
    shift = now_ms() - parse_timestamp(meta["at"])
    for i, (agent, host) in enumerate(zip(meta["agents"], meta["hosts"])):
        out = tmp_path / f"agent-{i}.ndjson"
        with open(folder / f"agent-{i}.ndjson") as src, open(out, "w") as dst:
            for line in src:
                doc = json.loads(line)
                doc["@timestamp"] = fleet.iso(parse_timestamp(doc["@timestamp"]) + shift)
                dst.write(json.dumps(doc) + "\n")
        c = two.a if i % 2 == 0 else two.b
        r = procs.replay(str(out), c.url, str(tmp_path / f"s{i}"), agent, host)
        assert r.returncode == 0, r.stderr[-2000:]
    want = [json.loads(x) for x in (folder / "expected.ndjson").read_text().splitlines() if x.strip()]
    assert _rows(two.db, parse_timestamp(meta["at"]) + shift) == {fleet.row_tuple(w) for w in want}


def test_one_batch_raced_to_both_collectors_is_stored_once(two: Pair) -> None:
    resp = requests.post(
        two.a.url + "/api/v1/enroll",
        json={"enrollment_secret": procs.SECRET, "agent_id": "racer", "host_name": "race-host"},
        timeout=10,
    )
    assert resp.status_code == 200
    key = resp.json()["api_key"]
    t = now_ms()
    epoch = os.urandom(16).hex()
    statuses: list[str] = []
    lock = threading.Lock()

    def post(url: str, body: bytes) -> None:
        r = requests.post(
            url + "/api/v1/batches",
            data=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"},
        )
        assert r.status_code == 200, r.text
        with lock:
            statuses.append(r.json()["status"])

    n = 20
    for seq in range(1, n + 1):
        body = wire.encode_batch(
            wire.Batch(
                os.urandom(16).hex(),
                epoch,
                seq,
                "racer",
                "race-host",
                t,
                (wire.EventRecord(t - 1000 - seq, "creation", b"/usr/sbin/nginx", b"/race/x", {}),),
                (wire.CountRecord(b"/usr/sbin/nginx", b"/race/%d" % seq, (t - 2000, t - 1999)),),
            )
        )
        threads = [threading.Thread(target=post, args=(c.url, body)) for c in (two.a, two.b)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert sorted(statuses) == ["duplicate"] * n + ["stored"] * n
    rows = {(r["file.path"], r["cc"]) for r in procs.evaluate(two.db, t)}
    assert rows == {(f"/race/{s}", 2) for s in range(1, n + 1)}  # /race/x: 20 events, not rare


def test_continuous_schedule_on_two_replicas_alerts_each_pair_once(db: str, tmp_path: Path) -> None:
    f = fleet.generate(23, n_agents=3, n_pairs=30, noise=0, at_ms=now_ms())
    files = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        files[name] = tmp_path / name / "alerts.ndjson"
    extra = ("--schedule", "continuous", "--settle", "1s")
    with (
        procs.collector(str(tmp_path / "a"), *extra, "--alerts-file", str(files["a"]), db=db) as a,
        procs.collector(str(tmp_path / "b"), *extra, "--alerts-file", str(files["b"]), db=db) as b,
    ):
        for i, path in enumerate(f.write(str(tmp_path / "fleet"))):
            c = a if i % 2 == 0 else b
            r = procs.replay(path, c.url, str(tmp_path / f"s{i}"), f.agents[i], f.hosts[i])
            assert r.returncode == 0, r.stderr[-2000:]
        # Pairs rare from T to a minute later: every replica tick in between alerts them.
        later = fleet.oracle_rows(f, f.at_ms + 60_000)
        want = {(row[4], row[5]) for row in fleet.oracle_rows(f) & later}
        deadline = time.monotonic() + 30
        while True:
            ids: list[str] = []
            pairs = set()
            for p in files.values():
                if p.exists():
                    for line in p.read_text().splitlines():
                        doc = json.loads(line)
                        if doc["rule"]["id"] != Rule().rule_id:
                            continue  # the agents' enrollments, the other rules' alerts
                        ids.append(doc["kibana"]["alert"]["uuid"])
                        pairs.add((doc["process"]["executable"], doc["file"]["path"]))
            if want <= pairs or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert want and want <= pairs
    assert len(ids) == len(set(ids)) == len(pairs)  # no alert twice, whichever replica wrote it
    r = procs.run(["collector", "alerts", "--db", db, "--json"])
    assert r.returncode == 0, r.stderr
    docs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    stored = [d["kibana"]["alert"]["uuid"] for d in docs if d["rule"]["id"] == Rule().rule_id]
    assert sorted(stored) == sorted(ids)
