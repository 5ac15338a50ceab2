"""What comes after an alert's events, from the agent's outbox to the
collector's documents: the ``ctx`` of an event and the batch's ``notes`` on
the wire, the stores' notes and actions (SQLite and PostgreSQL), the alert
documents that carry them and the follow-up and action documents."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.collector import evaluate as ev
from agent.collector import responses
from agent.collector.enrichment import context_fields
from agent.collector.storage.base import Store
from agent.sensor.outbox import AgentStore, Candidate
from agent.shared import wire
from agent.shared.clock import FakeClock
from agent.shared.errors import WireError
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Rule
from agent.shared.wire.context import context_map
from tests.support import pg
from tests.unit.test_collector_store import Seq, T, agent, ev_

EXE = b"/usr/sbin/php-fpm8.2"
SHELL = b"/var/www/html/uploads/s.php"
REQ = {"ts": T - 500, "ip": "203.0.113.7", "m": "POST", "url": "/upload.php", "st": 200, "n": 12,
       "ua": "curl/8", "ref": "", "log": "/var/log/nginx/access.log", "w": True}  # fmt: skip
CTX = {
    "pkg": {"own": False},
    "root": {"in": True, "srv": "nginx", "dir": b"/var/www/html", "url": "/uploads/s.php", "exec": True},
    "sig": ["exec_call", "request_to_exec"],
    "req": [REQ],
}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = pg.backend_store(request.param, tmp_path, request)
    yield s
    s.close()


# ------------------------------------------------------------------ the wire


def _agent_store(tmp_path: Path, clock: FakeClock) -> AgentStore:
    s = AgentStore(str(tmp_path / "a.db"), Rule(), clock, context=lambda c: dict(CTX, seen=c.host_path))
    s.set_rules([Rule().rule_id])
    s.notes_ok = True  # as the shipper sets it once the collector's answer says so
    return s


def _event(ts: int) -> FileEvent:
    return FileEvent(ts, "creation", SHELL, ProcessInfo(pid=9, name="php-fpm8.2", executable=EXE),
                     UserInfo("33", "www-data"))  # fmt: skip


def test_the_context_and_notes_go_out_with_the_batch_and_decode_as_they_were(tmp_path: Path) -> None:
    clock = FakeClock(T)
    s = _agent_store(tmp_path, clock)
    s.record([_event(T)])
    assert s.lease("a", "h", 100) is None  # waiting for its context, like its facts
    clock.advance(2)
    assert s.fill_facts() == 1
    s.add_notes([{"ts": T, "exe": EXE, "path": SHELL, "kind": "req", "reqs": [dict(REQ, w=False)]}])
    lease = s.lease("a", "h", 100)
    assert lease is not None and lease.n == 2
    batch = wire.decode_batch(lease.body)
    [e] = batch.events
    assert e.detail["ctx"] == CTX  # the agent's own extra key ("seen") is not part of the format: dropped
    [(ts, exe, path, kind, body)] = batch.notes
    assert (ts, exe, path, kind) == (T, EXE, SHELL, "req")
    assert msgpack.unpackb(body, raw=False) == {"reqs": [dict(REQ, w=False)]}
    assert wire.decode_rows(lease.body).notes == batch.notes


def test_the_fast_and_slow_decoders_agree_on_a_context() -> None:
    e = {"ts": T, "action": "creation", "exe": EXE, "path": SHELL, "pname": "php-fpm8.2", "ctx": CTX}
    body = msgpack.packb({"v": 1, "batch_id": "a" * 32, "epoch": "b" * 32, "agent_id": "a", "host_name": "h",
                          "seq": 1, "sent_at": T, "events": [e]}, use_bin_type=True)  # fmt: skip
    assert wire.decode_batch(body).events[0].detail["ctx"] == CTX


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c["pkg"].update(own="no"), "ctx.pkg.own"),
        (lambda c: c["root"].update(dir=""), "ctx.root.dir"),
        (lambda c: c.update(sig=["x" * 129]), "ctx.sig[0]"),
        (lambda c: c.update(req=[dict(REQ, st=1000)]), "ctx.req[0].st"),
        (lambda c: c.update(req=[REQ] * 9), "ctx.req"),
        (lambda c: c["req"][0].pop("ts"), "ctx.req[0].ts"),
    ],
)
def test_a_bad_context_is_refused_naming_the_field(change: Any, where: str) -> None:
    bad = copy.deepcopy(CTX)
    change(bad)
    with pytest.raises(WireError) as got:
        context_map(bad, "ctx")
    assert where in str(got.value)


def test_a_note_batch_alone_is_a_batch_and_a_bad_note_is_refused() -> None:
    head = {"v": 1, "batch_id": "a" * 32, "epoch": "b" * 32, "agent_id": "a", "host_name": "h", "seq": 1,
            "sent_at": T}  # fmt: skip
    note = {"ts": T, "exe": EXE, "path": SHELL, "kind": "act", "act": {"id": 3, "result": "quarantined"}}
    assert len(wire.decode_batch(msgpack.packb({**head, "notes": [note]}, use_bin_type=True)).notes) == 1
    for bad, where in (
        ({**note, "kind": "x"}, "notes[0].kind"),
        ({**note, "act": {"result": "q"}}, "act.id"),
    ):
        with pytest.raises(WireError) as got:
            wire.decode_batch(msgpack.packb({**head, "notes": [bad]}, use_bin_type=True))
        assert where in str(got.value)


# ------------------------------------------------------------ the documents


def test_the_context_becomes_ecs_fields_of_the_original_event() -> None:
    doc = context_fields(CTX)
    assert doc["rarewrite.package.owned"] is False and "rarewrite.package.differs" not in doc
    assert doc["rarewrite.web_root.path"] == "/var/www/html" and doc["rarewrite.web_root.executable"] is True
    assert (doc["source.ip"], doc["http.request.method"], doc["url.original"]) == (
        "203.0.113.7",
        "POST",
        "/upload.php",
    )
    assert doc["http.response.status_code"] == 200 and doc["user_agent.original"] == "curl/8"
    assert (
        "rarewrite.in_write_window" not in doc and doc["rarewrite.requests"][0]["rarewrite.in_write_window"]
    )
    owned = context_fields({"pkg": {"own": True, "mgr": "dpkg", "name": "nginx-common", "diff": True}})
    assert owned == {"rarewrite.package.owned": True, "rarewrite.package.manager": "dpkg",
                     "rarewrite.package.name": "nginx-common", "rarewrite.package.differs": True}  # fmt: skip


def _stored_alert(store: Store) -> list[dict[str, Any]]:
    return ev.run_continuous(store, Rule(), T + 60_000, 0)


def test_notes_before_the_alert_ride_on_it_and_notes_after_it_are_follow_ups(store: Store) -> None:
    a = agent(store, "a")
    s = Seq()
    call = dict(REQ, ts=T + 1000, url="/uploads/s.php", w=False)
    before = (T, EXE, SHELL, "req", msgpack.packb({"reqs": [call]}, use_bin_type=True))
    batch = s.batch(a, (ev_(T, SHELL, EXE, pname="php-fpm8.2", uname="www-data", uid="33", ctx=CTX),))
    assert store.ingest(a, replace(wire.rows_of(batch), notes=(before,)), T) == "stored"
    [alert] = _stored_alert(store)
    [e] = alert["rarewrite"]["events"]
    assert e["url.original"] == "/upload.php" and e["rarewrite.content.signals"] == [
        "exec_call",
        "request_to_exec",
    ]
    assert [r["url.original"] for r in e["rarewrite.followup_requests"]] == ["/uploads/s.php"]
    # later: a second call, after the alert went out
    later = (T, EXE, SHELL, "req", msgpack.packb({"reqs": [dict(call, ts=T + 90_000)]}, use_bin_type=True))
    assert [a[:2] for a in store.alerts_about((EXE, SHELL), T)] == [
        (alert["kibana"]["alert"]["uuid"], Rule().rule_id)
    ]
    docs = responses.after_notes(store, a, [later], T + 100_000)
    [fu] = docs
    assert fu["event"]["action"] == "alert_followup" and fu["file"]["path"] == SHELL.decode()
    assert fu["rarewrite"]["followup"]["alert_id"] == alert["kibana"]["alert"]["uuid"]
    assert (
        responses.after_notes(store, a, [later], T + 200_000)[0]["kibana"]["alert"]["uuid"]
        == fu["kibana"]["alert"]["uuid"]
    )
    assert (
        responses.after_notes(store, a, [(T, EXE, b"/other", "req", later[4])], T) == []
    )  # no alert: nothing yet


def test_quarantine_actions_are_queued_once_handed_out_and_finished_by_the_report(store: Store) -> None:
    a, b = agent(store, "a"), agent(store, "b")
    s = Seq()
    assert (
        store.ingest(a, s.batch(a, (ev_(T, SHELL, EXE, pname="php-fpm8.2", uname="www-data", uid="33"),)), T)
        == "stored"
    )
    [alert] = _stored_alert(store)
    assert responses.quarantine_rows(set(), [alert], T) == []  # the rule does not ask
    rows = responses.quarantine_rows({Rule().rule_id}, [alert], T)
    assert rows == [(alert["kibana"]["alert"]["uuid"], Rule().rule_id, EXE, SHELL, T, "a")]
    store.queue_actions(rows)
    store.queue_actions(rows)  # a suppressed alert's update asks again: one action
    [act] = store.pending_actions(a.ref)
    assert (act.alert_id, act.exe, act.path) == (alert["kibana"]["alert"]["uuid"], EXE, SHELL)
    assert store.pending_actions(b.ref) == []
    wire_act = responses.action_for_agent(act)
    assert wire_act["type"] == "quarantine" and wire_act["path_b64"]
    report = {
        "act": {
            "id": act.id,
            "alert": act.alert_id,
            "rule": act.rule_id,
            "result": "quarantined",
            "qid": "q" * 32,
        }
    }
    note = (T + 5, EXE, SHELL, "act", msgpack.packb(report, use_bin_type=True))
    assert store.ingest(a, replace(wire.rows_of(s.batch(a)), notes=(note,)), T + 10) == "stored"
    assert store.pending_actions(a.ref) == []
    [doc] = responses.after_notes(store, a, [note], T + 10)
    assert doc["event"]["action"] == "quarantine" and doc["rarewrite"]["response"]["result"] == "quarantined"


def test_an_older_collector_never_sees_notes_in_a_batch_without_them(tmp_path: Path) -> None:
    s = _agent_store(tmp_path, FakeClock(T))
    s.context = None
    s.record([_event(T)])
    lease = s.lease("a", "h", 100)
    assert lease is not None and b"notes" not in lease.body
    assert Candidate(SHELL, T, EXE, SHELL, "php-fpm8.2").host_path == SHELL


def test_notes_wait_for_a_collector_that_takes_them_and_bad_context_costs_only_itself(tmp_path: Path) -> None:
    clock = FakeClock(T)
    s = _agent_store(tmp_path, clock)
    s.notes_ok = False  # an older collector: a batch of notes alone would be refused
    s.add_notes([{"ts": T, "exe": EXE, "path": SHELL, "kind": "req", "reqs": []}])
    assert s.depth() == 0 and s.counters["notes_dropped"] == 1
    # a context a file name made unpackable (a lone surrogate), then one that raises: the facts still go
    calls = iter([{"root": {"in": True, "url": "/\udcff.php"}}, RuntimeError("bug")])

    def context(c: Candidate) -> dict[str, Any]:
        got = next(calls)
        if isinstance(got, Exception):
            raise got
        return got

    s.context = context
    s.facts = lambda path: None
    s.record([_event(T), _event(T + 1)._replace(path=b"/var/www/html/b.php")])
    clock.advance(2)
    s.fill_facts()
    lease = s.lease("a", "h", 100)
    assert lease is not None
    assert [e.detail.get("ctx") for e in wire.decode_batch(lease.body).events] == [None, None]
    assert s.counters["context_errors"] == 1
