"""The new-terms and outbreak rules end to end: live agents on the real
kernel, a real collector with the continuous schedule, alerts in its file.

- A web server (a dash copy named nginx, as www-data) writing one path five
  times within a second makes the first rule's ``cc < 5`` false: it stays
  silent, and the new-terms rule alerts the first write.
- The same file dropped on three hosts within a minute: three agents, each in
  its own mount namespace (its own tmpfs web root and its own
  /etc/machine-id, so its own host.id), get one outbreak alert naming the
  three hosts.
- A php-fpm pool running as a per-site user (Debian's nginx and php-fpm, a
  web shell uploaded through the site's form): the first rule's user list
  never matches it; the new-terms rule catches it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule, OutbreakRule
from tests.e2e.test_live_agent import FAST, start_agent
from tests.support import php_site, procs
from tests.support.writers import www_tempdir

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fanotify, mount namespaces and setpriv"),
]
AS_WWW = ["setpriv", "--reuid=33", "--regid=33", "--clear-groups"]
WAIT_S = 30.0
SETTLE_S = 2


def alerts_of(path: Path, rule_id: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [d for d in docs if d["rule"]["id"] == rule_id]


def wait_for(
    what: Callable[[], list[dict[str, Any]]], n: int = 1, timeout: float = WAIT_S
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if len(got) >= n:
            return got
        time.sleep(0.2)
    return what()


def namespaced(htdocs: str, machine_id: str) -> list[str]:
    """Run the agent in a mount namespace of its own: a tmpfs web root only it
    (and what runs in its namespace) sees, and its own machine id."""
    script = (
        f"mount -t tmpfs -o mode=755 rw-htdocs {htdocs} && chown 33:33 {htdocs}"
        f' && mount --bind {machine_id} /etc/machine-id && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def in_ns(agent_pid: int, *cmd: str) -> None:
    subprocess.run(["nsenter", "-t", str(agent_pid), "-m", *AS_WWW, *cmd], check=True, timeout=60)


def test_five_writes_hide_from_the_first_rule_and_one_file_on_three_hosts_is_one_outbreak(
    tmp_path: Path,
) -> None:
    with www_tempdir("rw-e2e-rules-") as base:
        htdocs, nginx = f"{base}/htdocs", f"{base}/bin/nginx"  # */htdocs/*: a web content path
        os.makedirs(htdocs)
        os.makedirs(f"{base}/bin")
        os.chmod(f"{base}/bin", 0o755)  # noqa: S103 - www-data runs the writer
        shutil.copy("/bin/dash", nginx)
        alerts = tmp_path / "alerts.ndjson"
        extra = ("--schedule", "continuous", "--settle", f"{SETTLE_S}s", "--alerts-file", str(alerts))
        agents = []
        with procs.collector(str(tmp_path), *extra) as c:
            try:
                for i in range(3):
                    home = tmp_path / f"host{i}"
                    home.mkdir()
                    (home / "machine-id").write_text(uuid.uuid4().hex + "\n")
                    prefix = namespaced(htdocs, str(home / "machine-id"))
                    p, _, _ = start_agent(home, c.url, htdocs, FAST, prefix, ("--host-name", f"web-{i}"))
                    agents.append(p)
                files = _write(agents, nginx, htdocs)
                written = time.time()
                _five_times(files, nginx, alerts)
                _three_hosts(files, alerts)
                time.sleep(
                    max(0.0, written + SETTLE_S + 2 - time.time())
                )  # the first rule's settle and ticks
                first = {a["file"]["path"] for a in alerts_of(alerts, Rule().rule_id)}
                assert files["once"] in first, first  # the control: the first rule is live
                assert files["hidden"] not in first and files["drop"] not in first, (
                    first
                )  # cc 5, agent_count 3
                outbreaks = [a for a in alerts_of(alerts, OutbreakRule().rule_id)]
                assert len(outbreaks) == 1, outbreaks
            finally:
                for p in agents:
                    procs.stop(p)


def _write(agents: list[Any], nginx: str, htdocs: str) -> dict[str, str]:
    files = {k: f"{htdocs}/{k}.php" for k in ("once", "hidden", "drop")}
    pid = agents[0].pid
    in_ns(pid, nginx, "-c", f"echo '<?php' > {files['once']}")  # written once: rare to the first rule
    hidden = files["hidden"]  # five creations of one path within a second, by one web server
    in_ns(
        pid,
        nginx,
        "-c",
        f"for i in 1 2 3 4 5; do rm -f {hidden}; echo '<?php system($_GET[c]);' > {hidden}; done",
    )
    for p in agents:  # one campaign, three hosts, moments apart
        in_ns(p.pid, nginx, "-c", f"echo '<?php eval($_POST[x]);' > {files['drop']}")
        time.sleep(0.3)
    return files


def _five_times(files: dict[str, str], nginx: str, alerts: Path) -> None:
    nt = wait_for(
        lambda: [a for a in alerts_of(alerts, NewTermsRule().rule_id) if a["file"]["path"] == files["hidden"]]
    )
    assert len(nt) == 1, nt
    [doc] = nt
    assert doc["kibana"]["alert"]["rule"]["name"] == doc["rule"]["name"] == NewTermsRule().name
    assert doc["process"]["executable"] == nginx and doc["host"]["name"] == ["web-0"]
    [ev] = doc["rarewrite"]["events"]
    assert ev["user.name"] == "www-data" and ev["process.name"] == "nginx", ev


def _three_hosts(files: dict[str, str], alerts: Path) -> None:
    drop = files["drop"]
    out = wait_for(
        lambda: [a for a in alerts_of(alerts, OutbreakRule().rule_id) if a["file"]["path"] == drop]
    )
    assert len(out) == 1, out
    [doc] = out
    assert sorted(doc["host"]["name"]) == ["web-0", "web-1", "web-2"], doc["host"]
    assert len(set(doc["host"]["id"])) == 3 and doc["rarewrite"]["outbreak"]["host_count"] == 3
    assert doc["rule"]["name"] == OutbreakRule().name and doc["kibana"]["alert"]["severity"] == "high"
    assert {e["host.name"] for e in doc["rarewrite"]["events"]} == {"web-0", "web-1", "web-2"}
    nt = [a for a in alerts_of(alerts, NewTermsRule().rule_id) if a["file"]["path"] == drop]
    assert sorted(a["host"]["name"][0] for a in nt) == ["web-0", "web-1", "web-2"]  # new on each host


@pytest.mark.slow
def test_a_per_site_php_fpm_pool_is_caught_by_the_new_terms_rule(tmp_path: Path) -> None:
    why = php_site.installed()
    if why:
        pytest.skip(why)
    alerts = tmp_path / "alerts.ndjson"
    extra = ("--schedule", "continuous", "--settle", f"{SETTLE_S}s", "--alerts-file", str(alerts))
    with php_site.site_user("rwsite1", 2901) as user, php_site.running_site(pool_user=user) as site:
        with procs.collector(str(tmp_path), *extra) as c:
            agent, _, _ = start_agent(tmp_path, c.url, site.root)
            try:
                body, headers = php_site.multipart("photo", "avatar.php", php_site.SHELL, "image/png")
                status, reply, _ = php_site.request(site, "POST", "/upload.php", body, headers)
                assert status == 200, (status, reply)
                shell = f"{site.root}/uploads/avatar.php"
                written = time.time()
                nt = wait_for(
                    lambda: [
                        a for a in alerts_of(alerts, NewTermsRule().rule_id) if a["file"]["path"] == shell
                    ]
                )
                time.sleep(max(0.0, written + SETTLE_S + 3 - time.time()))
                first = [a for a in alerts_of(alerts, Rule().rule_id) if a["file"]["path"] == shell]
            finally:
                procs.stop(agent)
    assert len(nt) == 1, (nt, c.log_text()[-2000:])
    [ev] = nt[0]["rarewrite"]["events"]
    assert (ev["user.name"], str(ev["user.id"])) == ("rwsite1", "2901"), ev
    assert ev["process.name"] == "php-fpm8.2" and nt[0]["process"]["executable"] == php_site.PHP_FPM
    assert ev["event.action"] in ("creation", "rename"), ev
    assert not first, first  # the first rule's users never include a per-site pool
