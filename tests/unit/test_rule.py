"""The rule as data: every name and pattern, near misses, window edges, and
the expected rows of the shared scenarios and of generated fleets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.sensor.sources.recorded import read_ndjson
from agent.shared.events import FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import (
    PROCESS_NAMES,
    USER_IDS,
    USER_NAMES,
    Rule,
    Sighting,
    like_regex,
    matches,
    reference_rows,
)
from agent.shared.text import parse_timestamp
from tests.support import fleet

RULE = Rule()
T = 1_795_780_800_000
SCENARIOS = Path(__file__).resolve().parents[3] / "shared" / "scenarios"


def ev(
    pname: str = "nginx",
    uname: str = "www-data",
    uid: str = "33",
    action: str = "creation",
    os_type: str = "linux",
    ts: int = T,
    etype: tuple[str, ...] = ("creation",),
) -> FileEvent:
    return FileEvent(
        ts,
        action,
        b"/var/www/x.php",
        ProcessInfo(1, pname, b"/usr/sbin/" + pname.encode()),
        UserInfo(uid, uname),
        etype,
        os_type=os_type,
    )


@pytest.mark.parametrize("name", [n for n in PROCESS_NAMES if "*" not in n])
def test_every_listed_process_name_matches(name: str) -> None:
    assert matches(RULE, ev(pname=name, uid="1"))


@pytest.mark.parametrize(
    "name",
    [
        "php-fpm8.2",
        "php-",
        "php-cgi",
        "python",
        "python3.11",
        "ruby",
        "ruby3.1",
        "perl",
        "perl5.36",
        "pythonista",
    ],
)
def test_like_patterns_match(name: str) -> None:
    assert matches(RULE, ev(pname=name))


@pytest.mark.parametrize(
    "name",
    [
        "php",
        "Nginx",
        "xpython",
        "tomcat",
        "PHP-fpm",
        "pytho",
        "apache2ctl",
        "node20",
        "javaw",
        "rub",
        "nginx ",
        " nginx",
        "",
        "Python3",
    ],
)
def test_near_miss_process_names_do_not_match(name: str) -> None:
    assert not matches(RULE, ev(pname=name))


@pytest.mark.parametrize("uname", USER_NAMES)
def test_every_listed_user_name_matches(uname: str) -> None:
    assert matches(RULE, ev(uname=uname, uid="12345"))


@pytest.mark.parametrize("uid", USER_IDS)
def test_user_id_alone_matches_under_another_name(uid: str) -> None:
    assert matches(RULE, ev(uname="svc-web", uid=uid))


@pytest.mark.parametrize(
    ("uname", "uid"),
    [
        ("WWW-DATA", "1001"),
        ("www", "1002"),
        ("root", "0"),
        ("alice", "1000"),
        ("www-data ", "34"),
        ("", "330"),
    ],
)
def test_near_miss_users_do_not_match(uname: str, uid: str) -> None:
    assert not matches(RULE, ev(uname=uname, uid=uid))


@pytest.mark.parametrize(
    ("action", "os_type", "ok"),
    [
        ("creation", "linux", True),
        ("rename", "linux", True),
        ("deletion", "linux", False),
        ("modification", "linux", False),
        ("creation", "windows", False),
        ("creation", "Linux", False),
    ],
)
def test_action_and_os(action: str, os_type: str, ok: bool) -> None:
    assert matches(RULE, ev(action=action, os_type=os_type)) is ok


def test_user_and_process_must_both_match_unless_or() -> None:
    assert not matches(RULE, ev(pname="bash"))
    assert not matches(RULE, ev(uname="root", uid="0"))
    either = Rule(combinator="or")
    assert matches(either, ev(pname="bash")) and matches(either, ev(uname="root", uid="0"))
    assert not matches(either, ev(pname="bash", uname="root", uid="0"))


def test_strict_event_type_keeps_only_change() -> None:
    strict = Rule(strict_event_type=True)
    assert not matches(strict, ev())
    assert matches(strict, ev(action="rename", etype=("change",)))
    assert not matches(strict, ev(action="rename", etype=("change", "creation")))  # multi-valued: null


@pytest.mark.parametrize(
    ("pattern", "text", "ok"),
    [
        ("php-*", "php-", True),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("a.c", "abc", False),
        ("a\\*", "a*", True),
        ("a\\*", "ab", False),
        ("x[0-9]", "x[0-9]", True),
        ("x[0-9]", "x1", False),
        ("a*", "a\nb", True),
    ],
)
def test_like_has_star_and_question_mark_only(pattern: str, text: str, ok: bool) -> None:
    assert bool(like_regex(pattern).match(text)) is ok


@pytest.mark.parametrize(
    ("offset", "inside"), [(-3_600_000, False), (-3_599_999, True), (0, True), (1, False)]
)
def test_window_edges(offset: int, inside: bool) -> None:
    rows = reference_rows(RULE, [Sighting("a", "h", ev(ts=T + offset))], T)
    assert bool(rows) is inside


@pytest.mark.parametrize(("n", "rows"), [(4, 1), (5, 0), (6, 0)])
def test_count_threshold(n: int, rows: int) -> None:
    sightings = [Sighting("a", "h", ev(ts=T - i)) for i in range(n)]
    assert len(reference_rows(RULE, sightings, T)) == rows


def test_a_pair_seen_by_two_agents_is_not_rare() -> None:
    sightings = [Sighting("a", "h1", ev()), Sighting("b", "h2", ev())]
    assert reference_rows(RULE, sightings, T) == []


def test_limit_keeps_the_smallest_counts() -> None:
    rule = Rule(limit=3)
    sightings = []
    for k in range(6):
        e = ev()
        for _ in range(1 + k % 3):
            sightings.append(
                Sighting("a", "h", FileEvent(T, "creation", f"/p{k}".encode(), e.process, e.user))
            )
    assert [r.cc for r in reference_rows(rule, sightings, T)] == [1, 1, 2]


def _scenario_dirs() -> list[Path]:
    return sorted(p for p in SCENARIOS.glob("*") if (p / "meta.json").exists()) if SCENARIOS.exists() else []


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("folder", _scenario_dirs(), ids=lambda p: p.name)
def test_shared_scenarios_give_the_expected_rows(folder: Path, strict: bool) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    sightings = []
    for i, (agent, host) in enumerate(zip(meta["agents"], meta["hosts"])):
        for item in read_ndjson(str(folder / f"agent-{i}.ndjson")):
            assert isinstance(item, FileEvent)
            sightings.append(Sighting(agent, host, item))
    rows = reference_rows(Rule(strict_event_type=strict), sightings, parse_timestamp(meta["at"]))
    name = "expected-strict-event-type.ndjson" if strict else "expected.ndjson"
    want = [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]
    got = {
        (
            r.cc,
            r.agent_count,
            r.host_names,
            r.agent_ids,
            os.fsdecode(r.executable or b""),
            os.fsdecode(r.path or b""),
        )
        for r in rows
    }
    assert got == {fleet.row_tuple(w) for w in want}
    assert [r.cc for r in rows] == sorted(r.cc for r in rows)


@pytest.mark.parametrize("seed", range(25))
def test_generated_fleets_match_the_sql_oracle(seed: int, tmp_path: Path) -> None:
    f = fleet.generate(seed, n_agents=2 + seed % 4, n_pairs=30 + seed)
    sightings = []
    for i, path in enumerate(f.write(str(tmp_path))):
        for item in read_ndjson(path):
            assert isinstance(item, FileEvent)
            sightings.append(Sighting(f.agents[i], f.hosts[i], item))
    rows = reference_rows(RULE, sightings, f.at_ms)
    got = {
        (
            r.cc,
            r.agent_count,
            r.host_names,
            r.agent_ids,
            os.fsdecode(r.executable or b""),
            os.fsdecode(r.path or b""),
        )
        for r in rows
    }
    assert got == fleet.oracle_rows(f)
    assert got, "a fleet without rows proves little"


@pytest.mark.parametrize(
    ("doc", "value"),
    [
        ({"host": {"os": {"type": "linux"}}}, "linux"),
        ({"host.os.type": "linux"}, "linux"),
        ({"host.os": {"type": "linux"}}, "linux"),
        ({"host": {"os.type": "linux"}}, "linux"),
        ({"host.os.type": "linux", "host": {"os": {"type": "linux"}}}, None),  # two values: null
        ({"host": {"os": {"type": ["linux"]}}}, "linux"),
        ({"host": {"os": "linux"}}, None),
    ],
)
def test_replay_reads_a_field_however_the_document_splits_it(doc: dict[str, object], value: object) -> None:
    from agent.sensor.sources.recorded import get, scalar

    assert scalar(get(doc, "host.os.type")) == value


def test_user_names_are_exact_like_the_querys_in_list() -> None:
    """`user.name in (...)` in ES|QL is exact: an entry with `*` or `?` is not a pattern."""
    rule = Rule(user_names=("www*", "ng?nx"), user_ids=())
    assert rule.user_matches("www*", None) and rule.user_matches("ng?nx", None)
    assert not rule.user_matches("www-data", None) and not rule.user_matches("nginx", None)
    assert Rule(process_names=("php-*",)).process_matches("php-fpm8.2")  # process names keep LIKE
