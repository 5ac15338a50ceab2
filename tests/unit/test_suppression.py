"""Alert suppression, the limit's cut rows, and the actors that carry
exceptions to bare count times: on both stores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from agent.collector import evaluate as ev
from agent.collector.storage import open_store
from agent.collector.storage.base import Store
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.errors import WireError
from agent.shared.exceptions import RuleException
from agent.shared.recommended import RECOMMENDED
from agent.shared.rule import Rule
from tests.unit.test_collector_store import EXE, Seq, T, agent, ev_

SUPPRESS = ("host.name", "process.executable", "file.directory", "file.extension")
SETTLE = 1000


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = (
        CollectorStore(str(tmp_path / "c.db"))
        if request.param == "sqlite"
        else open_store(request.getfixturevalue("pg_url"))
    )
    yield s
    s.close()


def paths(docs: list[dict[str, object]]) -> list[str]:
    return sorted(d["file"]["path"] for d in docs)  # type: ignore[index]


def test_suppression_folds_only_what_its_key_says(store: Store) -> None:
    a, s = agent(store, "a"), Seq()
    rule = replace(Rule(), suppress_by=SUPPRESS)
    store.ingest(a, s.batch(a, (ev_(T - 9000, b"/srv/up/1.jpg"), ev_(T - 8000, b"/srv/up/2.jpg"))), T)
    first = ev.run_continuous(store, rule, T, SETTLE)
    assert len(first) == 1  # 2.jpg has 1.jpg's key: folded
    sup = first[0]["kibana"]["alert"]["suppression"]
    assert sup["docs_count"] == 1 and sup["terms"][0] == {"field": "host.name", "value": ["host-a"]}
    assert [x["file.path"] for x in first[0]["rarewrite"]["suppressed"]] == ["/srv/up/2.jpg"]
    # another extension, another directory, another executable: never folded
    store.ingest(
        a,
        s.batch(a, (ev_(T - 7000, b"/srv/up/x.php"), ev_(T - 6000, b"/srv/other/3.jpg"),
                    ev_(T - 5000, b"/srv/up/4.jpg", exe=b"/usr/bin/python3"))),
        T,
    )  # fmt: skip
    second = ev.run_continuous(store, rule, T + 1, SETTLE)
    assert paths(second) == ["/srv/other/3.jpg", "/srv/up/4.jpg", "/srv/up/x.php"]
    # a fold later: the grown alert goes out again, same uuid, once a minute at most
    store.ingest(a, s.batch(a, (ev_(T + 10, b"/srv/up/5.jpg"),)), T)
    assert ev.run_continuous(store, rule, T + 2000, SETTLE) == []
    later = ev.run_continuous(store, rule, T + 61_000, SETTLE)
    assert [d["kibana"]["alert"]["uuid"] for d in later] == [first[0]["kibana"]["alert"]["uuid"]]
    assert later[0]["kibana"]["alert"]["suppression"]["docs_count"] == 2
    assert ev.run_continuous(store, rule, T + 200_000, SETTLE) == []  # nothing grew since
    listed = [d["file"]["path"] for d in store.list_alerts(0)]
    assert sorted(listed) == ["/srv/other/3.jpg", "/srv/up/1.jpg", "/srv/up/4.jpg", "/srv/up/x.php"]
    stored = next(d for d in store.list_alerts(0) if d["file"]["path"] == "/srv/up/1.jpg")
    assert stored["kibana"]["alert"]["suppression"]["docs_count"] == 2


def test_suppression_window_and_missing_values(store: Store) -> None:
    a, s = agent(store, "a"), Seq()
    rule = replace(Rule(), suppress_by=("file.extension",), suppress_for_ms=10_000)
    store.ingest(a, s.batch(a, (ev_(T - 5000, b"/a/noext"), ev_(T - 4000, b"/b/noext2"))), T)
    assert len(ev.run_continuous(store, rule, T, SETTLE)) == 1  # missing is one more value
    store.ingest(a, s.batch(a, (ev_(T + 20_000, b"/c/noext3"),)), T)
    # past suppress_for of the first alert: a new alert
    assert paths(ev.run_continuous(store, rule, T + 30_000, SETTLE)) == ["/c/noext3"]
    strict = replace(rule, rule_id="strict", suppress_missing="do_not_suppress")
    assert len(ev.run_continuous(store, strict, T + 31_000, SETTLE)) == 3


def test_rows_over_the_limit_are_counted_and_alerted_next(store: Store) -> None:
    a, s = agent(store, "a"), Seq()
    store.ingest(a, s.batch(a, tuple(ev_(T - 9000 + i, b"/w/%d.php" % i) for i in range(5))), T)
    stats: dict[str, int] = {}
    rule = replace(Rule(), limit=2)
    first = ev.run_continuous(store, rule, T, SETTLE, stats)
    assert len(first) == 2 and {d["rarewrite"]["rows_cut"] for d in first} == {3}
    assert stats["cut"] == 3
    second = ev.run_continuous(store, rule, T + 1000, SETTLE, stats)
    third = ev.run_continuous(store, rule, T + 2000, SETTLE, stats)
    assert len(second) == 2 and len(third) == 1 and "rows_cut" not in third[0]["rarewrite"]
    assert len({d["file"]["path"] for d in first + second + third}) == 5
    assert stats["cut"] == 3 + 1


def test_exceptions_remove_bare_count_times_by_their_actor(store: Store) -> None:
    """A pair past count_below goes on as count times: their actor still
    decides the exceptions on process.name and user.*."""
    a, s = agent(store, "a"), Seq()
    php = ("php-fpm8.2", "www-data", "33")
    store.ingest(
        a,
        s.batch(
            a,
            (ev_(T - 100, b"/var/www/x.php", pname="nginx", uname="www-data", uid="33"),),
            (wire.CountRecord(EXE, b"/var/www/x.php", tuple(T - 90 + i for i in range(6)), php),),
        ),
        T,
    )
    assert ev.evaluate(store, Rule(), T) == []  # 7 events: no row
    not_php = RuleException("no-php", (("process.name", ("php-fpm*",)),))
    rows = ev.evaluate(store, replace(Rule(), exceptions=(not_php,)), T)
    assert [(r.path, r.cc) for r in rows] == [(b"/var/www/x.php", 1)]
    by_uid = RuleException("uid", (("user.id", ("33",)),))
    assert ev.evaluate(store, replace(Rule(), exceptions=(by_uid,)), T) == []  # all of it removed: no row
    doc = ev.alert_documents(replace(Rule(), exceptions=(not_php,)), ev.excepted.ranked_rows(
        store, replace(Rule(), exceptions=(not_php,)), T), T, store)[0]  # fmt: skip
    assert [e.get("process.name") for e in doc["rarewrite"]["events"]] == ["nginx"]


def test_actors_round_trip_and_bad_actors_are_refused() -> None:
    c = wire.CountRecord(EXE, b"/p", (T, T + 1), ("php-fpm8.2", None, "33"))
    b = wire.Batch("a" * 32, "b" * 32, 1, "ag", "h", T, (), (c, wire.CountRecord(EXE, b"/q", (T,))))
    assert wire.decode_batch(wire.encode_batch(b)).counts == b.counts
    doc = msgpack.unpackb(wire.encode_batch(b), raw=False)
    for bad, where in (
        ([["x", None, None]], "actors"),
        ([["x"], None], "actors[0]"),
        ([[1, None, None], None], "actors[0][0]"),
    ):
        doc["actors"] = bad
        with pytest.raises(WireError) as e:
            wire.decode_batch(msgpack.packb(doc, use_bin_type=True))
        assert where in str(e.value)
    del doc["actors"]  # an older agent: no actors, the same counts
    assert [c.times for c in wire.decode_batch(msgpack.packb(doc, use_bin_type=True)).counts] == [
        (T, T + 1),
        (T,),
    ]


@pytest.mark.parametrize(
    ("path", "pname", "removed"),
    [
        (b"/var/lib/php/sessions/sess_4k2j9", "php-fpm8.2", True),
        (b"/var/lib/nginx/body/0000000042", "nginx", True),
        (b"/var/lib/nginx/body/0000000042", "php-fpm8.2", False),  # nginx's temp dir, written by php
        (b"/tmp/systemd-private-x-php8.2-fpm.service-y/tmp/phpAb12Cd", "php-fpm8.2", True),
        (b"/var/www/html/uploads/5f3a9.jpg", "php-fpm8.2", True),
        (b"/var/www/html/uploads/shell.php", "php-fpm8.2", False),
        (b"/var/www/html/uploads/shell.php.jpg.php", "php-fpm8.2", False),
        (b"/var/www/html/uploads/.htaccess", "php-fpm8.2", False),
        (b"/var/www/html/.htaccess", "php-fpm8.2", False),
        (b"/var/www/html/cache/page-1.html", "php-fpm8.2", True),
        (b"/var/www/html/cache/x.php", "php-fpm8.2", False),
        (b"/var/www/app/storage/framework/sessions/Zx9", "php-fpm8.2", True),
        (b"/usr/share/x/a.py.dpkg-new", "dpkg", True),
        (b"/srv/app/__pycache__/m.cpython-311.pyc", "python3", True),
        (b"/var/www/app/storage/logs/laravel-2026-12-02.log", "php-fpm8.2", True),
        (b"/var/www/app/storage/logs/x.php", "php-fpm8.2", False),
        (b"/dev/shm/x", "php-fpm8.2", False),
        (b"/tmp/x.sh", "php-fpm8.2", False),
        (b"/etc/cron.d/x", "php-fpm8.2", False),
    ],
)
def test_recommended_list(path: bytes, pname: str, removed: bool) -> None:
    from agent.shared.exceptions import ExceptionSet

    xs = ExceptionSet(RECOMMENDED, T)
    assert xs.removes_event(b"/usr/sbin/x", path, "web-1", "a1", (pname, "www-data", "33")) is removed
    assert all(x.comment and x.source.startswith("https://") for x in RECOMMENDED)


def test_expired_exception_stops_applying_at_its_instant(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    a, s = agent(store, "a"), Seq()
    store.ingest(a, s.batch(a, (ev_(T - 10, b"/w/a.php"),)), T)
    x = RuleException("until-T", (("file.path", ("/w/*",)),), expires_ms=T)
    rule = replace(Rule(), exceptions=(x,))
    assert ev.evaluate(store, rule, T - 1) == []
    assert [r.path for r in ev.evaluate(store, rule, T)] == [b"/w/a.php"]
    assert json.loads(json.dumps(x.fields())) == {"file.path": ["/w/*"]}
    store.close()


def test_wire_keeps_old_collectors_counting() -> None:
    """The actors are a batch field beside counts: a reader that ignores it
    counts exactly the same times."""
    c = wire.CountRecord(EXE, b"/p", (T, T + 5), ("nginx", "www-data", "33"))
    body = wire.encode_batch(wire.Batch("a" * 32, "b" * 32, 1, "ag", "h", T, (), (c,)))
    doc = msgpack.unpackb(body, raw=False)
    assert doc["counts"] == [[EXE, b"/p", [T, 5]]] and doc["actors"] == [["nginx", "www-data", "33"]]
