"""The syslog output against a real rsyslog (Debian's rsyslogd, its stock
parsers and its default 8 KiB message size) over UDP, TCP and a unix socket
read by imuxsock, as /dev/log is: every header field lands where it should,
the message is the alert's JSON intact, and an alert larger than the limit
arrives shortened but whole, never cut into invalid JSON or, on TCP, into
bogus extra messages."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.collector.outputs.syslog import SyslogOutput
from tests.support import procs

RSYSLOGD = shutil.which("rsyslogd")
pytestmark = pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd not installed (.ci/run installs rsyslog)")

CONF = """
global(workDirectory="{work}" maxMessageSize="8k")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{sock}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="input" name="inputname" format="jsonf")
  property(outname="facility" name="syslogfacility-text" format="jsonf")
  property(outname="severity" name="syslogseverity-text" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
action(type="omfile" file="{out}" template="fields")
"""


def alert(n: int, severity: str = "medium", events: int = 1) -> dict[str, Any]:
    ev = {"process.command_line": "nginx -c 'x\ny\x1b[31m'", "file.path": "/var/www/\udcff.php"}
    return {
        "@timestamp": "2026-12-02T10:00:00.000Z",
        "kibana": {"alert": {"uuid": f"id-{n}", "severity": severity}},
        "rule": {"name": "Unusual File Creation by Web Server"},
        "file": {"path": "/var/www/html/shell.php"},
        "rarewrite": {"schedule": "continuous", "events": [dict(ev, n=i) for i in range(events)]},
    }


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[dict[str, Any]]:
    assert RSYSLOGD is not None
    work = tmp_path / "work"
    work.mkdir()
    ports = {"udp": procs.free_port(), "tcp": procs.free_port()}
    paths = {"sock": str(tmp_path / "log.sock"), "out": str(tmp_path / "out.jsonl"), "work": str(work)}
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(CONF.format(**ports, **paths))
    check = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(tmp_path / "rsyslogd.err", "wb") as err:
        p = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = os.path.exists(paths["sock"])
            with socket.socket() as s:
                ready = ready and s.connect_ex(("127.0.0.1", ports["tcp"])) == 0
            if ready:
                break
            assert p.poll() is None, (tmp_path / "rsyslogd.err").read_text()
            time.sleep(0.1)
        time.sleep(0.3)  # imudp binds at about the same time
        yield {**ports, **paths}
    finally:
        procs.stop(p)


def _received(out: str, want: int, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if len(lines) >= want:
                break
        time.sleep(0.1)
    return lines


def test_rsyslog_parses_every_field_and_the_json_over_udp_tcp_and_the_local_socket(
    rsyslog: dict[str, Any],
) -> None:
    outputs = {
        "imudp": SyslogOutput(f"udp://127.0.0.1:{rsyslog['udp']}", "u", facility="local0"),
        "imtcp": SyslogOutput(f"tcp://127.0.0.1:{rsyslog['tcp']}", "t", facility="local1"),
        "imuxsock": SyslogOutput(rsyslog["sock"], "x", facility="auth"),
    }
    try:
        for out in outputs.values():
            # a small alert, then one of about 60 KiB: over rsyslog's 8 KiB default
            out.emit([alert(1), alert(2, severity="high", events=400)])
        got = _received(rsyslog["out"], 6)
    finally:
        for out in outputs.values():
            out.close()
    by_input: dict[str, list[dict[str, Any]]] = {}
    for line in got:
        by_input.setdefault(line["input"], []).append(line)
    assert sorted(by_input) == ["imtcp", "imudp", "imuxsock"], got
    facility = {"imudp": "local0", "imtcp": "local1", "imuxsock": "auth"}
    for name, lines in by_input.items():
        assert len(lines) == 2, (name, lines)  # no bogus extra message from a cut frame
        small, big = (json.loads(line["msg"].strip()) for line in lines)
        assert small == json.loads(json.dumps(alert(1)))  # the whole alert, intact
        assert big["kibana"]["alert"]["uuid"] == "id-2" and big["rarewrite"]["truncated"] is True
        assert [line["severity"] for line in lines] == ["warning", "err"]
        assert {line["facility"] for line in lines} == {facility[name]}
        assert {line["app"] for line in lines} == {"rarewrite"}
        assert {line["procid"] for line in lines} == {str(os.getpid())}
        if name == "imuxsock":  # the local format: no structured data, no msgid
            assert {line["sd"] for line in lines} == {"-"}
        else:
            assert {line["msgid"] for line in lines} == {"alert"}
            assert {line["sd"] for line in lines} == {
                f'[origin software="rarewrite" swVersion="{__version__}"]'
            }
            assert {line["hostname"] for line in lines} == {socket.gethostname()}
