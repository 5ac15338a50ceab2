"""The fleet pipeline, end to end with real processes: one `collector serve`,
one `agent replay` per agent, then `collector evaluate`, compared with the
independent SQL answer on generated fleets and the shared scenarios."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import requests

from tests.support import fleet, procs

SCENARIOS = Path(__file__).resolve().parents[3] / "shared" / "scenarios"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _replay_fleet(f: fleet.Fleet, tmp: Path, c: procs.Collector) -> None:
    for i, path in enumerate(f.write(str(tmp / "fleet"))):
        r = procs.replay(path, c.url, str(tmp / f"state-{i}"), f.agents[i], f.hosts[i])
        assert r.returncode == 0, r.stderr[-2000:]


def _got(c: procs.Collector, at_ms: int) -> list[dict[str, Any]]:
    return procs.evaluate(c.db, at_ms)


@pytest.mark.parametrize("seed", [17, 41])  # more seeds: tests/unit/test_evaluate_oracle.py
def test_generated_fleets_equal_the_query(seed: int, tmp_path: Path) -> None:
    f = fleet.generate(seed, n_agents=3 + seed % 3, n_pairs=60, noise=60, at_ms=now_ms())
    with procs.collector(str(tmp_path)) as c:
        _replay_fleet(f, tmp_path, c)
        got = _got(c, f.at_ms)
        want = fleet.oracle_rows(f)
        assert {fleet.row_tuple(r) for r in got} == want and len(got) == len(want)
        assert [r["cc"] for r in got] == sorted(r["cc"] for r in got)
        # T in the past, while retained: a different window, still exact
        earlier = f.at_ms - 20 * 60_000
        assert {fleet.row_tuple(r) for r in _got(c, earlier)} == fleet.oracle_rows(f, earlier)


def test_rows_past_the_limit_keep_the_smallest_counts(tmp_path: Path) -> None:
    f = fleet.generate(5, n_agents=2, n_pairs=400, noise=0, at_ms=now_ms())
    want = fleet.oracle_rows(f)
    assert len(want) > 100
    with procs.collector(str(tmp_path)) as c:
        _replay_fleet(f, tmp_path, c)
        got = _got(c, f.at_ms)
    assert len(got) == 100
    assert {fleet.row_tuple(r) for r in got} <= want
    assert [r["cc"] for r in got] == sorted(w[0] for w in want)[:100]


@pytest.mark.parametrize(
    "name", sorted(p.name for p in SCENARIOS.glob("seed-*")) if SCENARIOS.exists() else []
)
def test_shared_scenarios_shifted_to_now(name: str, tmp_path: Path) -> None:
    folder = SCENARIOS / name
    meta = json.loads((folder / "meta.json").read_text())
    from agent.shared.text import parse_timestamp

    shift = now_ms() - parse_timestamp(meta["at"])
    with procs.collector(str(tmp_path)) as c:
        for i, (agent, host) in enumerate(zip(meta["agents"], meta["hosts"])):
            out = tmp_path / f"agent-{i}.ndjson"
            with open(folder / f"agent-{i}.ndjson") as src, open(out, "w") as dst:
                for line in src:
                    doc = json.loads(line)
                    doc["@timestamp"] = fleet.iso(parse_timestamp(doc["@timestamp"]) + shift)
                    dst.write(json.dumps(doc) + "\n")
            r = procs.replay(str(out), c.url, str(tmp_path / f"s{i}"), agent, host)
            assert r.returncode == 0, r.stderr[-2000:]
        got = _got(c, parse_timestamp(meta["at"]) + shift)
    want = [json.loads(x) for x in (folder / "expected.ndjson").read_text().splitlines() if x.strip()]
    assert {fleet.row_tuple(r) for r in got} == {fleet.row_tuple(w) for w in want}


def test_a_resent_batch_changes_no_count_and_late_events_count(tmp_path: Path) -> None:
    f = fleet.generate(8, n_agents=2, n_pairs=40, noise=10, at_ms=now_ms())
    paths = f.write(str(tmp_path / "fleet"))
    with procs.collector(str(tmp_path)) as c:
        r = procs.replay(paths[0], c.url, str(tmp_path / "s0"), f.agents[0], f.hosts[0])
        assert r.returncode == 0, r.stderr
        only_first = fleet.Fleet(f.at_ms, f.agents[:1], f.hosts[:1], f.docs[:1])
        assert {fleet.row_tuple(x) for x in _got(c, f.at_ms)} == fleet.oracle_rows(only_first)
        # Batches under every (epoch, seq) the agent used, new ids and bodies (a restored
        # snapshot): the collector stores none of them and says so (409: start a new epoch).
        key = json.loads((tmp_path / "s0" / "api_key").read_text())["api_key"]
        before = _got(c, f.at_ms)
        sent = _sent_batches(tmp_path / "s0")
        for body in sent:
            resp = requests.post(
                c.url + "/api/v1/batches",
                data=body,
                timeout=10,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"},
            )
            assert resp.status_code == 409 and "new epoch" in resp.text, resp.text
        assert _got(c, f.at_ms) == before
        # The second agent was offline; its events count when they arrive.
        r = procs.replay(paths[1], c.url, str(tmp_path / "s1"), f.agents[1], f.hosts[1])
        assert r.returncode == 0, r.stderr
        assert {fleet.row_tuple(x) for x in _got(c, f.at_ms)} == fleet.oracle_rows(f)


def _sent_batches(state: Path) -> list[bytes]:
    """Batches named like the ones the agent sent (same epoch, every seq it
    used, new batch ids and bodies): the collector must store none of them
    (a used seq never counts twice) and answer 409, never "stored" or
    "duplicate" (which the agent would take as delivered)."""
    import sqlite3

    db = sqlite3.connect(state / "agent.db")
    epoch = db.execute("SELECT v FROM meta WHERE k='epoch'").fetchone()[0]
    next_seq = int(db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()[0])
    ident = json.loads((state / "identity.json").read_text())["agent_id"]
    bodies = []
    for seq in range(1, next_seq):
        doc = {
            "v": 1,
            "batch_id": f"{seq:032x}",
            "epoch": epoch,
            "seq": seq,
            "agent_id": ident,
            "host_name": "x",
            "sent_at": now_ms(),
            "events": [{"ts": now_ms(), "action": "creation", "exe": b"/usr/sbin/nginx", "path": b"/resent"}],
            "counts": [],
            "gaps": [],
        }
        bodies.append(msgpack.packb(doc, use_bin_type=True))
    assert bodies
    return bodies


def test_replay_reports_bad_lines_and_goes_on(tmp_path: Path) -> None:
    f = fleet.generate(2, n_agents=1, n_pairs=10, noise=0, at_ms=now_ms())
    path = f.write(str(tmp_path / "fleet"))[0]
    with open(path, "a") as out:
        out.write("{not json\n[1, 2]\n" + json.dumps({"event": {"action": "creation"}}) + "\n")
    with procs.collector(str(tmp_path)) as c:
        r = procs.replay(path, c.url, str(tmp_path / "s"), f.agents[0], f.hosts[0])
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("event=bad_line") == 3 and "line=" in r.stderr
        assert {fleet.row_tuple(x) for x in _got(c, f.at_ms)} == fleet.oracle_rows(f)


def test_replay_with_the_collector_down_fails_clearly_and_resumes(tmp_path: Path) -> None:
    f = fleet.generate(4, n_agents=1, n_pairs=10, noise=0, at_ms=now_ms())
    path = f.write(str(tmp_path / "fleet"))[0]
    port = procs.free_port()
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nrequest_timeout = 1s\n")
    args = [
        "agent",
        "replay",
        "--events",
        path,
        "--collector",
        f"http://127.0.0.1:{port}",
        "--config",
        str(conf),
        "--state-dir",
        str(tmp_path / "s"),
        "--agent-id",
        f.agents[0],
        "--host-name",
        f.hosts[0],
    ]
    r = procs.run(args, timeout=60)
    assert r.returncode != 0 and "acknowledge" in r.stderr
    with procs.collector(str(tmp_path), port=port) as c:
        r = procs.run(args, timeout=60)
        assert r.returncode == 0, r.stderr
        assert {fleet.row_tuple(x) for x in _got(c, f.at_ms)} == fleet.oracle_rows(f)
