"""The new-terms rule is exact: over generated fleets spanning more than the
7-day history, the new events the collector keeps (and the alerts it raises)
equal an oracle's, event for event, on SQLite and PostgreSQL.

The oracle owes nothing to agent.shared.rules: it parses the published KQL
query (tests/data/via_web_server.kql, copied verbatim from the rule as
published) into an SQL ``WHERE`` over one flat table of every event written,
then keeps an event when no earlier event of the same (host, executable,
path) lies in the 7 days before it. The implementation's path is the
product's: RuleSet.mask on the agent, AgentStore.record, lease, wire decode,
batch_time.checked, terms.split, Store.ingest, fleet_rules.run_new_terms.
"""
# ruff: noqa: S608  (the oracle's SQL is made from the test's own query file)

from __future__ import annotations

import contextlib
import random
import re
import sqlite3
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from agent.collector import batch_time, fleet_rules, terms
from agent.collector.storage.base import Store
from agent.collector.storage.sqlite import CollectorStore
from agent.sensor.outbox import AgentStore
from agent.shared import wire
from agent.shared.clock import FakeClock
from agent.shared.events import FileEvent, ProcessInfo, UserInfo, event_type_for
from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule, OutbreakRule, RuleSet
from agent.shared.text import iso
from tests.support import pg

QUERY = (Path(__file__).parents[1] / "data" / "via_web_server.kql").read_text()
PUBLISHED = (
    Path(__file__).parents[3] / "shared" / "rule" / "unusual-file-creation-via-web-server.new-terms.txt"
)
DAY = 86_400_000
HISTORY = 7 * DAY
T0 = 1_790_000_000_000
RETENTION = 30 * DAY


class Written(NamedTuple):
    """One file event as the host saw it: the oracle's row."""

    agent: str
    seq: int  # the agent's order
    ts: int
    action: str
    pname: Optional[str]
    exe: str
    uid: Optional[str]
    uname: Optional[str]
    path: str


# ------------------------------------------------------------------ the oracle: KQL -> SQL

COLUMNS = {
    "event.category": "'file'",  # every event here is a file event
    "host.os.type": "'linux'",
    "event.action": "action",
    "process.name": "pname",
    "file.extension": "ext",
    "file.path": "path",
    "user.id": "uid",
}
TOKEN = re.compile(r'\s*(?:(\()|(\))|(>=)|(:)|"([^"]*)"|([^\s():"<>=]+))')


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = TOKEN.match(text, pos)
        assert m, text[pos : pos + 40]
        pos = m.end()
        kinds = ("(", ")", ">=", ":", "quoted", "word")
        i = next(i for i, g in enumerate(m.groups()) if g is not None)
        out.append((kinds[i], m.group(i + 1)))
    return out


class KqlToSql:
    """The subset of KQL the rule uses: and/or/not, parentheses,
    ``field: value``, ``field: (v or v)``, ``field >= n``. A leaf never
    yields NULL (a missing field does not match), so ``not`` is KQL's."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def parse(self) -> str:
        sql = self._or()
        assert self.i == len(self.toks), self.toks[self.i :]
        return sql

    def _peek(self, kind: str, value: Optional[str] = None) -> bool:
        if self.i >= len(self.toks):
            return False
        k, v = self.toks[self.i]
        return k == kind and (value is None or v == value)

    def _take(self, kind: str) -> str:
        assert self._peek(kind), (kind, self.toks[self.i : self.i + 3])
        self.i += 1
        return self.toks[self.i - 1][1]

    def _or(self) -> str:
        parts = [self._and()]
        while self._peek("word", "or"):
            self.i += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def _and(self) -> str:
        parts = [self._not()]
        while self._peek("word", "and"):
            self.i += 1
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def _not(self) -> str:
        if self._peek("word", "not"):
            self.i += 1
            return f"(NOT {self._not()})"
        if self._peek("("):
            self.i += 1
            inner = self._or()
            self._take(")")
            return inner
        column = COLUMNS[self._take("word")]
        if self._peek(">="):
            self.i += 1
            n = int(self._take("word"))
            return f"(IFNULL({column} GLOB '[0-9]*' AND {column} NOT GLOB '*[^0-9]*', 0) AND CAST({column} AS INTEGER) >= {n})"
        self._take(":")
        return self._values(column)

    def _values(self, column: str) -> str:
        if not self._peek("("):
            return self._leaf(column)
        self.i += 1
        parts = [self._leaf(column)]
        while self._peek("word", "or"):
            self.i += 1
            parts.append(self._leaf(column))
        self._take(")")
        return "(" + " OR ".join(parts) + ")"

    def _leaf(self, column: str) -> str:
        kind, value = self.toks[self.i]
        self.i += 1
        assert kind in ("quoted", "word") and "'" not in value and "?" not in value and "[" not in value
        if kind == "word" and "*" in value:
            return f"IFNULL({column} GLOB '{value}', 0)"
        return f"IFNULL({column} = '{value}', 0)"


def _extension(path: str) -> Optional[str]:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[1] or None if "." in name else None


def oracle(written: list[Written]) -> list[tuple[str, str, str, int]]:
    """(agent, exe, path, ts) of every event that matches the query with no
    earlier one of its (host, exe, path) in the history before it."""
    where = KqlToSql(QUERY).parse()
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE TABLE e (agent, seq, ts, action, pname, exe, uid, uname, path, ext)")
        db.executemany(
            "INSERT INTO e VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*w, _extension(w.path)) for w in written],
        )
        db.execute(f"CREATE TABLE m AS SELECT * FROM e WHERE {where}")
        rows = db.execute(
            "SELECT agent, exe, path, ts FROM m WHERE NOT EXISTS (SELECT 1 FROM m AS p "
            " WHERE p.agent = m.agent AND p.exe = m.exe AND p.path = m.path"
            " AND (p.ts < m.ts OR (p.ts = m.ts AND p.seq < m.seq)) AND p.ts >= m.ts - ?)"
            " ORDER BY agent, exe, path, ts",
            (HISTORY,),
        ).fetchall()
        return [tuple(r) for r in rows]


# ------------------------------------------------------------------ generated fleets

ACTORS = [
    ("nginx", "/usr/sbin/nginx", "33", "www-data"),
    ("php-fpm8.2", "/usr/sbin/php-fpm8.2", "33", "www-data"),
    ("php-fpm8.2", "/usr/sbin/php-fpm8.2", "1001", "site1"),  # a per-site pool
    ("java", "/usr/lib/jvm/bin/java", "998", "tomcat"),
    ("node", "/usr/bin/node", "1000", "app"),
    ("node", "/usr/bin/node", "0", "root"),
    ("node", "/usr/bin/node", "999", "svc"),
    ("nodejs", "/usr/bin/nodejs", "1200", "app2"),
    ("python3.11", "/usr/bin/python3.11", "33", "www-data"),
    ("perl", "/usr/bin/perl", "33", "www-data"),
    ("lua5.4", "/usr/bin/lua5.4", "1002", "site2"),
    ("ruby3.1", "/usr/bin/ruby3.1", "1003", "site3"),
    ("dotnet", "/usr/bin/dotnet", "1004", "site4"),
    ("apache2", "/usr/sbin/apache2", "33", "www-data"),
    ("index.cgi", "/var/www/cgi-bin/index.cgi", "33", "www-data"),
    ("gunicorn: work", "/usr/bin/python3", "1005", "site5"),
    ("Nginx", "/opt/Nginx", "33", "www-data"),  # case: not a match
    ("bash", "/usr/bin/bash", "33", "www-data"),  # the first rule's, not this one's
]
PATHS = [
    "/var/www/html/shell.php",
    "/var/www/html/x.jsp",
    "/var/www/html/app.js",
    "/var/www/html/a.ts",
    "/var/www/html/noext",
    "/var/www/html/.htaccess",
    "/var/www/html/x.PHP",
    "/home/site1/public_html/index.php",
    "/home/site1/x",
    "/srv/app/storage/framework/sessions/abc",  # excluded for all
    "/mnt/WEB/s1/public_html/tmp/templates/frontend/t.php",  # excluded for php-fpm
    "/mnt/WEB/s1/public_html/wp-content/languages/de.json",  # excluded for php-fpm
    "/mnt/WEB/s1/public_html/wp-content/plugins/p.php",
    "/opt/tomcat9/webapps/ROOT.war",
    "/var/lib/tomcat9/webapps/a.jspx",
    "/var/www/app/Views/Home.cshtml",
    "/srv/www/app.wsgi",
    "/srv/www/run.cgi",
    "/home/u/lib/x.lua",
    "/home/u/config.ru",
    "/var/lib/php/sessions/sess_1",  # not a web content path
    "/tmp/x.cgi",
    "/usr/share/nginx/html/index.html",
]  # fmt: skip
GAPS = [0, 1, 60_000, DAY, 2 * DAY, 6 * DAY, HISTORY - 1, HISTORY, HISTORY + 1, 8 * DAY]


def fleet(rng: random.Random) -> dict[str, list[Written]]:
    """Per agent, its events in time order: combinations written again after
    gaps on and around the history's edge, over about three weeks."""
    agents = [f"agent-{i}" for i in range(rng.randint(2, 4))]
    raw: dict[str, list[tuple[int, str, tuple[str, str, str, str], str]]] = {a: [] for a in agents}
    for _ in range(rng.randint(25, 45)):
        actor, path = rng.choice(ACTORS), rng.choice(PATHS)
        start = T0 + rng.randrange(0, 5 * DAY)
        for agent in rng.sample(agents, rng.choice([1, 1, 2, len(agents)])):
            ts = start + rng.choice([0, 0, rng.randrange(DAY)])
            for _ in range(rng.randint(1, 5)):
                raw[agent].append((ts, rng.choice(["creation", "creation", "rename"]), actor, path))
                ts += rng.choice(GAPS)
    out = {}
    for agent, evs in raw.items():
        evs.sort(key=lambda e: e[0])
        out[agent] = [
            Written(agent, seq, ts, action, *actor, path) for seq, (ts, action, actor, path) in enumerate(evs)
        ]
    return out


def file_event(w: Written) -> FileEvent:
    return FileEvent(
        w.ts,
        w.action,
        w.path.encode(),
        ProcessInfo(pid=4242, name=w.pname, executable=w.exe.encode()),
        UserInfo(w.uid, w.uname),
        event_type=event_type_for(w.action),
        original_path=b"/var/www/tmp/upload.tmp" if w.action == "rename" else None,
    )


# ------------------------------------------------------------------ the product's path


class Fleet:
    """Agents (AgentStore each) shipping to one collector store, tick by tick."""

    def __init__(self, tmp: Path, store: Store, agents: list[str], rng: random.Random) -> None:
        self.rules = RuleSet(Rule(), (NewTermsRule(),))
        self.store, self.rng = store, rng
        self.clock = FakeClock(T0)
        self.agents: dict[str, AgentStore] = {}
        for i, agent in enumerate(agents):
            a = AgentStore(str(tmp / f"{agent}.db"), Rule(), self.clock)
            a.set_rules(self.rules.ids)
            a.host_id = f"{i:032x}"
            self.agents[agent] = a
            store.enroll(agent, f"web-{i:02d}", "k-" + agent, T0)
        self.alerts: list[dict] = []
        self.raised: dict[str, int] = {}  # as fleet_rules_loop keeps it

    def tick(self, now: int, since: int, due: dict[str, list[Written]]) -> None:
        self.clock._ms = now
        for agent, written in due.items():
            events = [file_event(w) for w in written]
            masks = [self.rules.mask(e) for e in events]
            kept = [(e, m) for e, m in zip(events, masks) if m]
            while kept:
                n = self.rng.randint(1, 12)
                chunk, kept = kept[:n], kept[n:]
                self.agents[agent].record([e for e, _ in chunk], masks=[m for _, m in chunk])
            self._ship(agent, now)
        self.alerts += fleet_rules.run_new_terms(
            self.store, NewTermsRule(), now, since, RETENTION, self.raised
        )

    def _ship(self, agent: str, now: int) -> None:
        outbox, rec = self.agents[agent], self.store.agent_for_key("k-" + agent)
        assert rec is not None
        while (lease := outbox.lease(agent, rec.host_name, self.rng.randint(1, 40))) is not None:
            batch = wire.decode_rows(lease.body)
            batch, dropped, _ = batch_time.checked(batch, now, RETENTION)
            assert not dropped
            batch, cands = terms.split(batch, Rule(), (NewTermsRule(),))
            assert self.store.ingest(rec, batch, now, cands) == "stored"
            outbox.ack(lease)

    def close(self) -> None:
        for a in self.agents.values():
            a.close()


def run(tmp: Path, store: Store, written: dict[str, list[Written]], rng: random.Random) -> Fleet:
    f = Fleet(tmp, store, sorted(written), rng)
    end = max(w.ts for ws in written.values() for w in ws)
    since = T0 - 1
    while since < end:
        now = since + rng.choice([DAY // 4, DAY, 2 * DAY])
        f.tick(now, since, {a: [w for w in ws if since < w.ts <= now] for a, ws in written.items()})
        since = now
    return f


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("seed", range(6))
def test_new_terms_equal_the_oracle(
    tmp_path: Path, seed: int, backend: str, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed)
    written = fleet(rng)
    store: Store = pg.backend_store(backend, tmp_path, request)
    f = run(tmp_path, store, written, rng)
    try:
        everything = [w for ws in written.values() for w in ws]
        want = oracle(everything)
        hits = store.term_hits(NewTermsRule().rule_id, 0, 1 << 62)
        got = sorted((h.agent_id, (h.exe or b"").decode(), (h.path or b"").decode(), h.ts) for h in hits)
        assert got == want, seed
        alerted = sorted(
            (a["agent"]["id"][0], a["process"]["executable"], a["file"]["path"], a["rarewrite"]["first_seen"])
            for a in f.alerts
        )
        assert alerted == [(a, e, p, iso(ts)) for a, e, p, ts in want]
        matched = _matching(everything)
        assert want and len(matched) > len(want), "nothing new, or nothing seen again: the run proved little"
        _outbreaks_equal_the_oracle(store, want)
    finally:
        f.close()
        store.close()


def _outbreaks_equal_the_oracle(store: Store, new: list[tuple[str, str, str, int]]) -> None:
    """outbreak_rows at T: the pairs new on at least ``hosts`` agents in
    (T - within, T], each agent's first new event, from the oracle's new events."""
    rule = OutbreakRule(hosts=2, within_ms=3 * DAY)
    times = sorted({ts + d for *_, ts in new for d in (0, -1, rule.within_ms, rule.within_ms + 1)})
    found = 0
    for at in times[:: max(1, len(times) // 40)]:
        groups: dict[tuple[str, str], dict[str, int]] = {}
        for agent, exe, path, ts in sorted(new, key=lambda n: n[3]):
            if at - rule.within_ms < ts <= at:
                groups.setdefault((exe, path), {}).setdefault(agent, ts)
        want = sorted(
            (min(by.values()), exe, path, tuple(sorted(by.items())))
            for (exe, path), by in groups.items()
            if len(by) >= rule.hosts
        )
        rows = fleet_rules.outbreak_rows(store, rule, NewTermsRule(), at)
        got = sorted(
            (
                r.first_ts,
                (r.exe or b"").decode(),
                (r.path or b"").decode(),
                tuple(sorted((h.agent_id, h.ts) for h in r.hits)),
            )
            for r in rows
        )
        assert got == want, at
        found += len(got)
    assert found, "no outbreak in the fleet: the comparison proved little"


def _matching(written: list[Written]) -> list[Written]:
    where = KqlToSql(QUERY).parse()
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE TABLE e (agent, seq, ts, action, pname, exe, uid, uname, path, ext)")
        db.executemany(
            "INSERT INTO e VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*w, _extension(w.path)) for w in written]
        )
        return [Written(*r[:9]) for r in db.execute(f"SELECT * FROM e WHERE {where}")]


def test_an_overlap_already_alerted_builds_no_document_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    f = Fleet(tmp_path, store, ["agent-0"], random.Random(1))
    try:
        shell = Written("agent-0", 0, T0 + 10, "creation", *ACTORS[1], "/var/www/html/shell.php")
        f.tick(T0 + 1000, T0, {"agent-0": [shell]})
        assert [a["file"]["path"] for a in f.alerts] == [shell.path]
        built = []
        real = fleet_rules.new_terms_alert
        monkeypatch.setattr(fleet_rules, "new_terms_alert", lambda *a: built.append(1) or real(*a))
        again = fleet_rules.run_new_terms(store, NewTermsRule(), T0 + 2000, T0, RETENTION, f.raised)
        assert again == [] and built == []  # the next tick's overlap: remembered, nothing built
        assert fleet_rules.run_new_terms(store, NewTermsRule(), T0 + 2000, T0, RETENTION) == []
        assert built == [1]  # without the memory: built, then found recorded already
    finally:
        f.close()
        store.close()


# ------------------------------------------------------------------ the oracle itself


def _one(**kw: str) -> bool:
    w = Written(
        "a",
        0,
        T0,
        kw.pop("action", "creation"),
        kw.pop("pname"),
        "/x",
        kw.pop("uid", "33"),
        None,
        kw.pop("path"),
    )
    return bool(_matching([w]))


def test_the_oracle_reads_the_query_as_published() -> None:
    assert _one(pname="php-fpm8.2", path="/var/www/html/s.php")
    assert not _one(pname="php-fpm8.2", path="/var/www/html/s.php", action="deletion")
    assert not _one(pname="Nginx", path="/var/www/html/s.php")
    assert _one(pname="java", path="/var/www/a.jsp") and not _one(pname="java", path="/var/www/a.php")
    assert not _one(pname="node", path="/var/www/a.js", uid="1000")  # the not (...) block
    assert not _one(pname="node", path="/var/www/a.js", uid="0")
    assert _one(pname="node", path="/var/www/a.js", uid="999")
    assert not _one(pname="nginx", path="/a/storage/framework/sessions/s")
    assert not _one(pname="php-fpm7", path="/mnt/WEB/x/public_html/wp-content/languages/a.json")
    assert _one(pname="nginx", path="/mnt/WEB/x/public_html/wp-content/languages/a.json")
    assert not _one(pname="nginx", path="/var/lib/php/sessions/sess_1")


def test_the_query_file_is_the_published_one() -> None:
    if not PUBLISHED.exists():
        pytest.skip(f"{PUBLISHED} is not here (it is the project's shared reference, outside the repository)")
    assert QUERY.strip() in PUBLISHED.read_text()


def test_generated_fleets_cover_the_edges() -> None:
    """Across the seeds the oracle meets what the rule is about: the history's
    edge both ways, renames, exclusions, gated processes and per-site users."""
    seen: dict[str, int] = dict.fromkeys(
        ("edge_seen", "edge_new", "rename", "excluded", "gated", "per_site"), 0
    )
    for seed in range(8):
        everything = [w for ws in fleet(random.Random(seed)).values() for w in ws]
        want = {(a, e, p, ts) for a, e, p, ts in oracle(everything)}
        matched = _matching(everything)
        last: dict[tuple[str, str, str], int] = {}
        for w in sorted(matched, key=lambda w: (w.agent, w.seq)):
            key, is_new = (w.agent, w.exe, w.path), (w.agent, w.exe, w.path, w.ts) in want
            gap = w.ts - last.get(key, -HISTORY * 9)
            seen["edge_seen"] += gap == HISTORY and not is_new
            seen["edge_new"] += gap == HISTORY + 1 and is_new
            seen["rename"] += w.action == "rename" and is_new
            seen["gated"] += w.pname in ("java", "node", "nodejs", "dotnet") and is_new
            seen["per_site"] += w.uname == "site1" and is_new
            last[key] = w.ts
        ids = {(w.agent, w.seq) for w in matched}
        seen["excluded"] += sum(
            1
            for w in everything
            if (w.agent, w.seq) not in ids and ("/sessions/abc" in w.path or "/mnt/WEB/" in w.path)
        )
    assert all(seen.values()), seen
