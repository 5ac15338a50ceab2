"""Continuous evaluation end to end: a live `rarewrite agent run` on the real
kernel, a real `rarewrite collector serve --schedule continuous`, and a web
server (a dash copy named nginx, as www-data) writing a file. The alert must
reach the alerts file within a bounded wait and carry the writer's pid (the
writer puts its own $$ in the file), its command line, the user and the
file's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.shared.rule import Rule
from tests.support import procs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fanotify and setpriv"),
]
AS_WWW = ["setpriv", "--reuid=33", "--regid=33", "--clear-groups"]
FAST = "[agent]\nship_interval = 200ms\nrequest_timeout = 5s\nbackoff_max = 1s\n"
ALERT_WAIT_S = 30.0


@pytest.fixture
def site() -> Iterator[dict[str, str]]:
    os.makedirs("/srv", exist_ok=True)
    base = tempfile.mkdtemp(prefix="rw-e2e-alerts-", dir="/srv")
    b = {"base": base, "bin": f"{base}/bin", "www": f"{base}/www"}
    os.makedirs(b["bin"])
    os.makedirs(b["www"])
    for d in (base, b["bin"]):
        os.chmod(d, 0o755)  # noqa: S103 - www-data must reach the writer
    shutil.chown(b["www"], 33, 33)
    shutil.copy("/bin/dash", f"{b['bin']}/nginx")
    os.symlink(os.path.realpath("/usr/bin/python3"), f"{b['bin']}/php-fpm8.2")
    try:
        yield b
    finally:
        shutil.rmtree(base, ignore_errors=True)


def start_agent(tmp: Path, url: str, watch: str) -> tuple[subprocess.Popen[bytes], str]:
    state = str(tmp / "agent")
    cfg = tmp / "agent.conf"
    cfg.write_text(FAST)
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    opts = ["--watch", watch, "--config", str(cfg)]
    with open(tmp / "agent.log", "ab") as log:
        p = subprocess.Popen(
            [*procs.RAREWRITE, "agent", "run", "--collector", url, "--state-dir", state, *opts],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = procs.run(["agent", "status", "--state-dir", state], timeout=20)
        if r.stdout.strip() and json.loads(r.stdout).get("state") == "running":
            return p, state
        assert p.poll() is None, (tmp / "agent.log").read_text()[-2000:]
        time.sleep(0.2)
    procs.stop(p)
    raise AssertionError("agent never said running: " + (tmp / "agent.log").read_text()[-2000:])


def wait_alert(alerts: Path, file_path: str, timeout: float) -> Optional[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alerts.exists():
            for line in alerts.read_text(encoding="ascii").splitlines():
                doc = json.loads(line)
                if doc["rule"]["id"] == Rule().rule_id and doc.get("file", {}).get("path") == file_path:
                    return dict(doc)
        time.sleep(0.1)
    return None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def the_event(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["rarewrite"]["schedule"] == "continuous"
    assert doc["rarewrite"]["cc"] == 1 and doc["rarewrite"]["agent_count"] == 1
    assert doc["kibana"]["alert"]["severity"] == "medium"
    [ev] = doc["rarewrite"]["events"]
    assert ev["user.name"] == "www-data" and str(ev["user.id"]) == "33", ev
    return dict(ev)


def test_web_server_writes_become_alerts_with_pid_command_line_user_and_sha256(
    site: dict[str, str], tmp_path: Path
) -> None:
    www, binp = site["www"], site["bin"]
    stage = f"{site['base']}/stage"  # outside the watched tree, same filesystem
    os.makedirs(stage)
    shutil.chown(stage, 33, 33)
    alerts = tmp_path / "alerts.ndjson"
    # 1. nginx (dash) creates the file and writes its own pid into it; it stays
    #    a moment so /proc still has it (short-lived writers are issue 4's business)
    shell = f"{www}/shell.php"
    dash_script = f"printf '<?php system($_GET[c]); // %s ?>\\n' $$ > {shell}; sleep 1"
    # 2. php-fpm (python) writes a staged file and renames it into the web root:
    #    the file is complete when it appears, so its hash is exact
    drop = f"{www}/drop.php"
    py_script = (
        "import os, time\n"
        f"p = '{stage}/drop.tmp'\n"
        "with open(p, 'w') as f:\n"
        "    f.write('<?php eval($_POST[x]); // %d ?>\\n' % os.getpid())\n"
        f"os.rename(p, '{drop}')\n"
        "time.sleep(1)\n"
    )
    extra = ("--schedule", "continuous", "--settle", "1s", "--alerts-file", str(alerts))
    with procs.collector(str(tmp_path), *extra) as c:
        agent, _ = start_agent(tmp_path, c.url, www)
        try:
            written = time.monotonic()
            subprocess.run([*AS_WWW, f"{binp}/nginx", "-c", dash_script], check=True, timeout=60)
            subprocess.run([*AS_WWW, f"{binp}/php-fpm8.2", "-c", py_script], check=True, timeout=60)
            shell_doc = wait_alert(alerts, shell, ALERT_WAIT_S)
            drop_doc = wait_alert(alerts, drop, ALERT_WAIT_S)
            took = time.monotonic() - written
        finally:
            procs.stop(agent)
        log = c.log_text()[-2000:]
    assert shell_doc is not None and drop_doc is not None, f"no alert within {ALERT_WAIT_S:.0f}s: {log}"
    assert took < 2 * ALERT_WAIT_S

    content = Path(shell).read_bytes()
    pid = int(content.split(b"// ")[1].split()[0])
    assert content == f"<?php system($_GET[c]); // {pid} ?>\n".encode()
    assert shell_doc["process"]["executable"] == f"{binp}/nginx"
    ev = the_event(shell_doc)
    assert ev["event.action"] == "creation"
    assert (ev["process.pid"], ev["process.name"]) == (pid, "nginx")
    assert dash_script in ev.get("process.command_line", ""), ev
    # FAN_CREATE comes before the write(); the agent reads the file's facts a
    # moment later, so the hash is that of what the web shell wrote.
    assert ev["file.hash.sha256"] == sha(content), ev

    content = Path(drop).read_bytes()
    pid = int(content.split(b"// ")[1].split()[0])
    assert content == f"<?php eval($_POST[x]); // {pid} ?>\n".encode()
    assert drop_doc["process"]["executable"] == os.path.realpath("/usr/bin/python3")
    ev = the_event(drop_doc)
    assert ev["event.action"] == "rename"
    assert ev["file.Ext.original.path"] == f"{stage}/drop.tmp"
    assert ev["process.pid"] == pid
    assert py_script in ev.get("process.command_line", ""), ev
    assert ev["file.hash.sha256"] == sha(content)
    assert ev["file.size"] == len(content)
