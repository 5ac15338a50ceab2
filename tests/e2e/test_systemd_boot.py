"""Both services from the installed .debs under a real, booted systemd.

The packages are installed on this machine with apt (as in
test_deb_installs_runs_and_purges), then ``systemd-nspawn -b`` boots
systemd as PID 1 of a container over this machine's /usr (``--volatile=yes``:
a fresh tmpfs root, /usr read-only from the host, /etc/rarewrite bound in),
and everything runs under the units exactly as packaged: Type=notify,
the watchdog, the agent's sandbox (ProtectSystem=strict,
MemoryDenyWriteExecute, its capability set). One allowance: nspawn's own
system call filter lacks fanotify's calls (a host has no such filter), so
the container gets them with ``--system-call-filter``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import agent
from tests.support import packages

TOP = Path(__file__).resolve().parents[2]
NSPAWN = shutil.which("systemd-nspawn")
DROPINS = {
    "/etc/rarewrite/agent.d/zz-boot-test.conf": "[agent]\ncollector = http://127.0.0.1:8787\nwatch = /srv/www\n"
    "ship_interval = 500ms\n",
    "/etc/rarewrite/collector.d/zz-boot-test.conf": "[collector]\nschedule = continuous\nsettle = 1s\n"
    "alerts_file = /var/lib/rarewrite/collector/alerts.ndjson\n",
}

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packages, systemd-nspawn, fanotify"),
    pytest.mark.skipif(NSPAWN is None, reason="systemd-nspawn missing (.ci/run installs systemd-container)"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian-family machine (apt-get)"),
]


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[None]:
    if os.path.exists("/usr/bin/rarewrite"):
        pytest.skip("rarewrite is already installed system-wide; not touching it")
    debs = packages.build_debs(tmp_path)
    try:
        packages.install(debs)
        for path, text in DROPINS.items():
            Path(path).write_text(text)
        yield
    finally:
        for path in DROPINS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        packages.purge()


class Booted:
    """A container booted with systemd as PID 1; :meth:`run` runs a command in it."""

    def __init__(self, log: Path) -> None:
        assert NSPAWN is not None
        # a build machine's policy-rc.d (101: start nothing) would stop deb-systemd-invoke in the
        # booted system too; a host that runs systemd has none, so the container gets one that allows
        hide = []
        if os.path.exists("/usr/sbin/policy-rc.d"):
            allow = log.parent / "policy-rc.d"
            allow.write_text("#!/bin/sh\nexit 0\n")
            allow.chmod(0o755)
            hide = [f"--bind-ro={allow}:/usr/sbin/policy-rc.d"]
        with open(log, "wb") as out:
            self.nspawn = subprocess.Popen(
                [NSPAWN, "-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "--machine=rwboot",
                 "-b", "--console=pipe", "--bind-ro=/etc/rarewrite", "--bind-ro=/etc/passwd",
                 "--bind-ro=/etc/group", "--bind-ro=/var/lib/dpkg/info",
                 "--system-call-filter=fanotify_init fanotify_mark open_by_handle_at name_to_handle_at",
                 *hide],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.log = log
        self.pid1 = self._find_pid1()

    def _find_pid1(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, self.log.read_text(errors="replace")[-3000:]
            for p in psutil.Process(self.nspawn.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if p.cmdline()[:1] == ["/usr/lib/systemd/systemd"] or p.name() == "systemd":
                        state = self._run_in(p.pid, "systemctl", "is-system-running").stdout.strip()
                        if state in ("running", "degraded"):
                            return p.pid
            time.sleep(0.5)
        raise AssertionError("systemd did not boot: " + self.log.read_text(errors="replace")[-3000:])

    @staticmethod
    def _run_in(pid: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "--", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._run_in(self.pid1, *args, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nspawn.pid, 15)  # nspawn powers the container off
        try:
            self.nspawn.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.nspawn.pid, 9)
            self.nspawn.wait()


def _until(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    return got


def test_the_installed_services_run_under_a_booted_systemd(installed: None, tmp_path: Path) -> None:
    box = Booted(tmp_path / "nspawn.log")
    try:
        for unit in ("rarewrite-collector", "rarewrite-agent"):
            started = box.run("systemctl", "start", unit)  # Type=notify: returns once READY=1 came
            journal = box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
            assert started.returncode == 0, started.stderr + journal[-3000:]
            props = box.show(unit, "ActiveState", "Type", "NotifyAccess", "WatchdogUSec")
            assert props == {"ActiveState": "active", "Type": "notify", "NotifyAccess": "main",
                             "WatchdogUSec": "1min"}, props  # fmt: skip
        status = json.loads(
            box.run("rarewrite", "agent", "status", "--state-dir", "/var/lib/rarewrite/agent").stdout
        )
        # the sandbox let it place its marks: fanotify, not the inotify fallback
        assert status["state"] == "running" and status["backend"] == "fanotify" and status["marked"], status

        # a web server's write inside the container reaches the collector as an alert
        setup = "mkdir -p /srv/www/bin && cp /bin/dash /srv/www/bin/nginx && chown 33:33 /srv/www"
        assert box.run("sh", "-c", setup).returncode == 0
        write = box.run(
            "setpriv",
            "--reuid=33",
            "--regid=33",
            "--clear-groups",
            "/srv/www/bin/nginx",
            "-c",
            ": > /srv/www/shell.php",
        )
        assert write.returncode == 0, write.stderr

        def shell_alerted() -> str:
            out = box.run("cat", "/var/lib/rarewrite/collector/alerts.ndjson").stdout
            return out if '"path":"/srv/www/shell.php"' in out else ""

        alerts = _until(shell_alerted)  # besides the agent's enrollment (a health alert)
        assert '"path":"/srv/www/shell.php"' in alerts, box.run(
            "journalctl", "--no-pager", "-o", "cat"
        ).stdout[-3000:]

        # idle after the write: the memory release (malloc_trim through ctypes) ran, and
        # nothing the system call filter refused, nothing broke
        # (every command run in the container is an exec the agent sees: look rarely)
        journal = ""
        for _ in range(8):
            time.sleep(4)
            journal = box.run("journalctl", "-u", "rarewrite-agent", "--no-pager", "-o", "cat").stdout
            if "event=memory_released" in journal:
                break
        assert "event=memory_released" in journal, journal[-3000:]
        assert not any(s in journal for s in ("EPERM", "Operation not permitted", "Traceback")), journal[
            -3000:
        ]

        # SIGKILL: systemd restarts it (Restart=on-failure), and it watches again
        main = box.show("rarewrite-agent", "MainPID")["MainPID"]
        assert box.run("kill", "-9", main).returncode == 0

        def restarted() -> dict[str, str] | None:
            p = box.show("rarewrite-agent", "NRestarts", "ActiveState", "MainPID")
            return p if p["ActiveState"] == "active" and p["MainPID"] not in ("0", main) else None

        again = _until(restarted, timeout=40)
        assert again and int(again["NRestarts"]) >= 1, again

        # an upgrade, as dpkg runs it (old prerm upgrade, new postinst configure OLD): what
        # ran is restarted onto the new code, what was stopped stays stopped
        assert box.run("systemctl", "stop", "rarewrite-collector").returncode == 0
        before = box.show("rarewrite-agent", "MainPID")["MainPID"]
        v = agent.__version__
        for pkg in ("agent", "collector"):
            prerm = box.run("sh", f"/var/lib/dpkg/info/rarewrite-{pkg}.prerm", "upgrade", v)
            assert prerm.returncode == 0, prerm.stderr
        assert box.show("rarewrite-agent", "ActiveState")["ActiveState"] == "active"  # not stopped for it
        for pkg in ("agent", "collector"):
            post = box.run("sh", f"/var/lib/dpkg/info/rarewrite-{pkg}.postinst", "configure", v)
            assert post.returncode == 0, post.stderr
        after = box.show("rarewrite-agent", "ActiveState", "MainPID")
        assert after["ActiveState"] == "active" and after["MainPID"] != before, after
        assert box.show("rarewrite-collector", "ActiveState")["ActiveState"] == "inactive"

        # systemd's own score of the units, online
        sec = box.run(
            "systemd-analyze", "security", "--no-pager", "rarewrite-collector", "rarewrite-agent"
        ).stdout
        scores = {
            m.group(1): float(m.group(2)) for m in re.finditer(r"(rarewrite-\w+)\.service\s+(\d+\.\d)", sec)
        }
        assert scores["rarewrite-collector"] <= 2.0 and scores["rarewrite-agent"] <= 3.3, sec
    finally:
        box.close()
