"""Generated fleets of ECS file events and an independent SQL answer.

The generator aims at the rule's edges: counts 3 to 6 per agent, pairs seen
by one or several agents, times on and next to T - 1 h and T, near-miss
names, uid-only users, non-Linux hosts, other actions, dotted keys and
scalar event.type. The oracle is the ES|QL query written as SQL over an
in-memory SQLite table, independent of agent.rule and the collector.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

HOUR = 3_600_000
WEB_PROCS = [
    "nginx",
    "apache2",
    "httpd",
    "java",
    "node",
    "gunicorn",
    "uwsgi",
    "caddy",
    "httpd.worker",
    "mongrel",
]
LIKE_PROCS = ["php-fpm8.2", "php-", "python3", "python", "python3.11", "ruby", "ruby3.1", "perl", "perl5.36"]
NEAR_PROCS = ["php", "Nginx", "xpython", "tomcat", "PHP-fpm", "bash", "nginx ", "pytho", "rub", "jav"]
WEB_USERS = [("www-data", "1500"), ("nginx", "0"), ("apache", "48"), ("tomcat9", "7"), ("ftpuser", "9")]
UID_ONLY = [("wd", "33"), ("svc", "99"), ("a", "498"), ("b", "48")]
OTHER_USERS = [("root", "0"), ("WWW-DATA", "1001"), ("alice", "1000"), ("www", "34")]
DIRS = ["/var/www/html", "/tmp", "/etc/cron.d", "/srv/app", "/dev/shm"]


def iso(ms: int) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass
class Fleet:
    at_ms: int
    agents: list[str]
    hosts: list[str]
    docs: list[list[dict[str, Any]]]  # per agent

    def write(self, folder: str) -> list[str]:
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i, docs in enumerate(self.docs):
            p = os.path.join(folder, f"agent-{i}.ndjson")
            with open(p, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
            paths.append(p)
        return paths


def _doc(
    rng: random.Random,
    ms: int,
    host: str,
    agent: str,
    user: tuple[str, str],
    proc: str,
    exe: str,
    path: str,
    action: str = "creation",
    os_type: str = "linux",
) -> dict[str, Any]:
    etype = {"creation": "creation", "rename": "change", "deletion": "deletion", "modification": "change"}[
        action
    ]
    doc: dict[str, Any] = {
        "@timestamp": iso(ms),
        "event": {"type": [etype], "action": action, "category": ["file"]},
        "host": {"name": host, "os": {"type": os_type}},
        "agent": {"id": agent},
        "user": {"name": user[0], "id": user[1]},
        "process": {"name": proc, "executable": exe, "pid": rng.randint(2, 99999)},
        "file": {"path": path},
    }
    if rng.random() < 0.15:  # dotted keys, event.type as a scalar
        flat: dict[str, Any] = {"@timestamp": doc["@timestamp"]}
        for top, sub in doc.items():
            if isinstance(sub, dict):
                for k, v in sub.items():
                    if isinstance(v, dict):
                        for k2, v2 in v.items():
                            flat[f"{top}.{k}.{k2}"] = v2
                    else:
                        flat[f"{top}.{k}"] = v
        flat["event.type"] = etype
        doc = flat
    return doc


def generate(
    seed: int, n_agents: int = 4, n_pairs: int = 40, noise: int = 40, at_ms: int | None = None
) -> Fleet:
    rng = random.Random(seed)
    at = at_ms if at_ms is not None else 1_795_780_800_000
    agents = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n_agents)]
    hosts = [f"host-{seed}-{i}" for i in range(n_agents)]
    docs: list[list[dict[str, Any]]] = [[] for _ in agents]

    def when() -> int:
        r = rng.random()
        if r < 0.1:
            return at - HOUR  # on the lower edge: out
        if r < 0.2:
            return at - HOUR + 1  # just inside
        if r < 0.27:
            return at  # upper edge: in
        if r < 0.32:
            return at + 1  # after T: out
        if r < 0.4:
            return at - HOUR - rng.randint(1, 600_000)
        return at - rng.randint(1, HOUR - 1)

    for k in range(n_pairs):
        proc = rng.choice(WEB_PROCS + LIKE_PROCS)
        exe = f"/usr/{rng.choice(['sbin', 'bin', 'local/bin'])}/{proc}"
        path = f"{rng.choice(DIRS)}/{seed}-{k}.php"
        seen = rng.sample(range(n_agents), min(n_agents, rng.choice([1, 1, 1, 2, 3])))
        for ai in seen:
            user = rng.choice(WEB_USERS + UID_ONLY)
            for _ in range(rng.choice([1, 2, 3, 4, 4, 5, 5, 6])):
                action = "rename" if rng.random() < 0.3 else "creation"
                docs[ai].append(_doc(rng, when(), hosts[ai], agents[ai], user, proc, exe, path, action))
    for _ in range(noise):
        ai = rng.randrange(n_agents)
        path = f"{rng.choice(DIRS)}/noise-{rng.randint(0, 20)}.php"
        kind = rng.randrange(5)
        proc = rng.choice(WEB_PROCS)
        user = rng.choice(WEB_USERS)
        action, os_type = "creation", "linux"
        if kind == 0:
            user = rng.choice(OTHER_USERS)
        elif kind == 1:
            proc = rng.choice(NEAR_PROCS)
        elif kind == 2:
            action = rng.choice(["deletion", "modification"])
        elif kind == 3:
            os_type = rng.choice(["windows", "macos"])
        docs[ai].append(
            _doc(rng, when(), hosts[ai], agents[ai], user, proc, f"/usr/sbin/{proc}", path, action, os_type)
        )
    for d in docs:
        rng.shuffle(d)
    return Fleet(at, agents, hosts, docs)


_QUERY = """
SELECT count(*), count(DISTINCT agent), group_concat(DISTINCT host), group_concat(DISTINCT agent), exe, path
FROM ev
WHERE ts > :t - :w AND ts <= :t AND os = 'linux' AND action IN ('creation', 'rename')
  AND (uname IN ('apache','www-data','httpd','nginx','lighttpd','tomcat','tomcat8','tomcat9','ftp','ftpuser','ftpd')
       OR uid IN ('99','33','498','48'))
  AND (pname IN ('apache','nginx','apache2','httpd','lighttpd','caddy','node','mongrel_rails','java','gunicorn',
                 'uwsgi','openresty','cherokee','h2o','resin','puma','unicorn','traefik','tornado','hypercorn',
                 'daphne','twistd','yaws','webfsd','httpd.worker','flask','rails','mongrel')
       OR pname GLOB 'php-*' OR pname GLOB 'python*' OR pname GLOB 'ruby*' OR pname GLOB 'perl*')
GROUP BY exe, path
HAVING count(DISTINCT agent) = 1 AND count(*) < 5
ORDER BY 1
"""


def _field(doc: dict[str, Any], name: str) -> Any:
    if name in doc:
        v = doc[name]
    else:
        v = doc
        for part in name.split("."):
            v = v.get(part) if isinstance(v, dict) else None
    if isinstance(v, list):
        v = v[0] if len(v) == 1 else None
    return v


def _ms(text: str) -> int:
    t = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    return round(t.timestamp() * 1000)


def oracle_rows(
    fleet: Fleet,
    at_ms: int | None = None,
    agent_ids: list[str] | None = None,
    host_names: list[str] | None = None,
) -> set[tuple[Any, ...]]:
    """The rule's rows as (cc, agent_count, hosts, agents, exe, path) tuples.

    ``agent_ids``/``host_names`` replace the documents' own (the agent stamps
    its identity); by default the fleet's are used."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE ev(ts, os, action, uname, uid, pname, exe, path, agent, host)")
    agent_ids = agent_ids or fleet.agents
    host_names = host_names or fleet.hosts
    for ai, docs in enumerate(fleet.docs):
        db.executemany(
            "INSERT INTO ev VALUES (?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    _ms(d["@timestamp"]),
                    _field(d, "host.os.type"),
                    _field(d, "event.action"),
                    _field(d, "user.name"),
                    _field(d, "user.id"),
                    _field(d, "process.name"),
                    _field(d, "process.executable"),
                    _field(d, "file.path"),
                    agent_ids[ai],
                    host_names[ai],
                )
                for d in docs
            ],
        )
    t = fleet.at_ms if at_ms is None else at_ms
    return {
        (cc, n, tuple(sorted(h.split(","))), tuple(sorted(a.split(","))), exe, path)
        for cc, n, h, a, exe, path in db.execute(_QUERY, {"t": t, "w": HOUR})
    }


def row_tuple(doc: dict[str, Any]) -> tuple[Any, ...]:
    """A row printed by ``collector evaluate`` in the oracle's shape."""
    return (
        doc["cc"],
        doc["agent_count"],
        tuple(sorted(doc["host.name"])),
        tuple(sorted(doc["agent.id"])),
        doc["process.executable"],
        doc["file.path"],
    )
