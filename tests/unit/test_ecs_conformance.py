"""Alert documents, and the original events inside them, against the ECS field
definitions (tests/data/ecs_fields.json: every field of the namespaces an
alert can touch, with its type, extracted from the ECS release's
generated/ecs/ecs_flat.yml): each field is an ECS field holding a value of
its type, a field of Elastic's alert schema (``kibana.alert.*``, as Elastic's
own detection alerts carry them), or sits under rarewrite's documented
custom namespace (``rarewrite.*``) or Elastic Defend's (``*.Ext.*``, for
the rename's source path, as Defend writes it)."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.collector import evaluate as ev
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.rule import Rule
from agent.shared.text import iso

DATA = json.loads((Path(__file__).parents[1] / "data" / "ecs_fields.json").read_text())
ECS: dict[str, dict[str, Any]] = DATA["fields"]
# Kibana's alert schema: the technical fields of a detection alert that rarewrite fills.
KIBANA = {
    "kibana.alert.uuid": "keyword",
    "kibana.alert.status": "keyword",
    "kibana.alert.workflow_status": "keyword",
    "kibana.alert.original_time": "date",
    "kibana.alert.reason": "keyword",
    "kibana.alert.severity": "keyword",
    "kibana.alert.risk_score": "float",
    "kibana.alert.building_block_type": "keyword",
    "kibana.alert.rule.name": "keyword",
    "kibana.alert.rule.rule_id": "keyword",
    "kibana.alert.rule.uuid": "keyword",
    "kibana.alert.rule.description": "keyword",
    "kibana.alert.rule.tags": "keyword",
    # alert suppression (Elastic's fields, kept by suppressed alerts)
    "kibana.alert.suppression.terms.field": "keyword",
    "kibana.alert.suppression.terms.value": "keyword",
    "kibana.alert.suppression.start": "date",
    "kibana.alert.suppression.end": "date",
    "kibana.alert.suppression.docs_count": "long",
    "kibana.alert.last_detected": "date",
}
T = 1_790_000_000_000


def flatten(doc: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) for every leaf; lists of objects are flattened
    under the same name (as Elasticsearch maps them), lists of values kept."""
    out: list[tuple[str, Any]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(doc, list) and any(isinstance(x, dict) for x in doc):
        for x in doc:
            out += flatten(x, prefix)
    else:
        out.append((prefix, doc))
    return out


def _type_ok(kind: str, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if kind in ("keyword", "wildcard", "match_only_text", "text", "constant_keyword", "ip"):
            ok = isinstance(v, str)
        elif kind == "long":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind in ("float", "scaled_float", "double"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif kind == "boolean":
            ok = isinstance(v, bool)
        elif kind == "date":
            ok = isinstance(v, str) and bool(dt.datetime.fromisoformat(v.replace("Z", "+00:00")))
        else:
            ok = False  # a type this check does not know: look at it
        if not ok:
            return False
    return True


def violations(doc: dict[str, Any]) -> list[str]:
    out = []
    for name, value in flatten(doc):
        if name == "rarewrite" or name.startswith("rarewrite."):
            continue
        if ".Ext." in name:  # Elastic Defend's documented custom namespace (file.Ext.original.path)
            continue
        if name.startswith("kibana."):
            kind = KIBANA.get(name)
            where = "Elastic's alert schema"
        else:
            spec = ECS.get(name)
            kind = spec["type"] if spec else None
            where = "ECS"
            if (
                spec
                and isinstance(value, list)
                and not spec["array"]
                and len(value) != 1
                and kind != "keyword"
            ):
                out.append(f"{name}: a list, but ECS does not say array")
        if kind is None:
            out.append(f"{name}: not in {where} and not under rarewrite.*")
        elif not _type_ok(kind, value):
            out.append(f"{name}: {value!r} is not a {kind}")
    return out


@pytest.fixture
def alert_doc(tmp_path: Path) -> dict[str, Any]:
    """A real alert from the evaluator: a created file with every detail and
    its facts, then a rename of the same pair, and a count time."""
    store = CollectorStore(str(tmp_path / "c.db"))
    try:
        store.enroll("a", "web-01", "h", T)
        agent = store.agent_for_key("h")
        assert agent is not None
        exe, path = b"/usr/sbin/nginx", b"/var/www/html/shell.php"
        detail = {
            "pid": 4242, "ppid": 1, "pname": "nginx", "cmd": "nginx: worker process", "uid": "33",
            "uname": "www-data", "attr": "exact", "ppname": "systemd", "ppexe": b"/lib/systemd/systemd",
            "etype": ["creation"],
            "file": {"size": 5, "mode": 0o100644, "uid": 33, "gid": 33, "sha256": "ab" * 32, "sample": b"<?php",
                     "gone": False},
            "ctx": {"pkg": {"own": True, "mgr": "dpkg", "name": "site", "diff": True},
                    "root": {"in": True, "srv": "nginx", "dir": b"/var/www/html", "url": "/shell.php", "exec": True},
                    "sig": ["exec_call"],
                    "req": [{"ts": T - 31, "ip": "203.0.113.7", "m": "POST", "url": "/up.php", "st": 200, "n": 9,
                             "ua": "curl/8", "ref": "http://x/", "log": "/var/log/nginx/access.log", "w": True}]},
        }  # fmt: skip
        rename = {**detail, "etype": ["change"], "orig": b"/var/www/html/x.tmp"}
        batch = wire.Batch(
            os.urandom(16).hex(), "e" * 32, 1, "a", "web-01", T,
            (wire.EventRecord(T - 30, "creation", exe, path, detail),
             wire.EventRecord(T - 20, "rename", exe, path, rename)),
            (wire.CountRecord(exe, path, (T - 10,)),),
        )  # fmt: skip
        store.ingest(agent, batch, T)
        [doc] = ev.run_hourly(store, Rule(), T)
        return doc
    finally:
        store.close()


def test_every_field_is_ecs_or_elastic_alert_or_rarewrite(alert_doc: dict[str, Any]) -> None:
    assert violations(alert_doc) == []
    assert alert_doc["ecs"]["version"] == DATA["ecs_version"]


def test_a_suppressed_alert_that_grew_is_ecs_too(tmp_path: Path) -> None:
    store = CollectorStore(str(tmp_path / "c.db"))
    try:
        store.enroll("a", "web-01", "h", T)
        agent = store.agent_for_key("h")
        assert agent is not None
        exe = b"/usr/sbin/php-fpm8.2"
        events = tuple(
            wire.EventRecord(T - 9000 + i, "creation", exe, b"/srv/up/%d.jpg" % i, {}) for i in range(3)
        )
        store.ingest(agent, wire.Batch(os.urandom(16).hex(), "e" * 32, 1, "a", "web-01", T, events), T)
        rule = replace(
            Rule(), suppress_by=("host.name", "process.executable", "file.directory", "file.extension")
        )
        [doc] = ev.run_continuous(store, rule, T, 1000)
        assert doc["kibana"]["alert"]["suppression"]["docs_count"] == 2
        assert violations(doc) == []
    finally:
        store.close()


def test_the_original_events_are_ecs_too(alert_doc: dict[str, Any]) -> None:
    events = alert_doc["rarewrite"]["events"]
    assert len(events) == 3 and events[-1]["rarewrite.detail"] == "count"
    bad = [f"event {i}: {v}" for i, e in enumerate(events) for v in violations(e)]
    assert bad == []
    assert events[0]["file.uid"] == "33" and events[0]["file.mode"] == "644"  # keyword, as ECS says


def test_the_alert_fields_are_what_elastic_alerts_carry(alert_doc: dict[str, Any]) -> None:
    k = alert_doc["kibana"]["alert"]
    assert alert_doc["event"]["kind"] == "signal"
    assert sorted(alert_doc["event"]["type"]) == ["change", "creation"]  # a creation and a rename
    assert k["rule"]["rule_id"] == Rule().rule_id and k["rule"]["uuid"] != k["rule"]["rule_id"]
    assert (k["status"], k["workflow_status"], k["building_block_type"]) == ("active", "open", "default")
    assert k["original_time"] == iso(T - 30) == alert_doc["rarewrite"]["first_seen"]  # the first event
    assert "/var/www/html/shell.php" in k["reason"] and len(k["uuid"]) == 64
    assert "alert" not in alert_doc and "cc" not in alert_doc  # nothing at the top level outside a namespace
    assert (alert_doc["rarewrite"]["cc"], alert_doc["rarewrite"]["agent_count"]) == (3, 1)


def test_the_checker_sees_a_wrong_type_and_a_field_outside_every_namespace() -> None:
    assert violations({"file": {"uid": 33}}) == ["file.uid: 33 is not a keyword"]
    assert violations({"cc": 1}) == ["cc: not in ECS and not under rarewrite.*"]
    assert violations({"kibana": {"alert": {"nope": 1}}}) == [
        "kibana.alert.nope: not in Elastic's alert schema and not under rarewrite.*"
    ]


def test_follow_up_and_response_documents_are_ecs_too() -> None:
    from agent.collector import responses

    req = {"ts": T, "ip": "203.0.113.7", "m": "GET", "url": "/s.php?c=id", "st": 200, "n": 3, "w": False}
    note = (T - 5, b"/usr/sbin/php-fpm8.2", b"/var/www/html/s.php", "req", {"reqs": [req]})
    [fu] = responses.followup_docs("a", "web-01", note, [("alert-1", "rule-1")], T)
    act = (T - 5, note[1], note[2], "act", {"act": {"id": 1, "alert": "alert-1", "result": "quarantined",
                                                    "qid": "q" * 32}})  # fmt: skip
    for doc in (fu, responses.action_doc("a", "web-01", act, T)):
        assert violations(doc) == [], doc
