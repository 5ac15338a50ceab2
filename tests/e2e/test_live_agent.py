"""`rarewrite agent run` on the real kernel against a real collector: only
web-server writes come out of `collector evaluate`; SIGHUP reloads; SIGTERM
flushes; a burst in a deep tree loses nothing (or says so)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fanotify and setpriv"),
]
AS_WWW = ["setpriv", "--reuid=33", "--regid=33", "--clear-groups"]
FAST = "[agent]\nship_interval = 200ms\nrequest_timeout = 5s\nbackoff_max = 1s\n"


@pytest.fixture
def site() -> Iterator[dict[str, str]]:
    os.makedirs("/srv", exist_ok=True)
    base = tempfile.mkdtemp(prefix="rw-e2e-", dir="/srv")
    out = tempfile.mkdtemp(prefix="rw-e2e-out-", dir="/var/tmp")
    b = {"base": base, "bin": f"{base}/bin", "www": f"{base}/www", "out": out}
    os.makedirs(b["bin"])
    os.makedirs(b["www"])
    for d in (base, b["bin"], out):
        os.chmod(d, 0o755)  # noqa: S103 - www-data must reach the writers
    shutil.chown(b["www"], 33, 33)
    shutil.chown(out, 33, 33)
    shutil.copy("/bin/dash", f"{b['bin']}/nginx")
    shutil.copy("/bin/dash", f"{b['bin']}/notweb")
    shutil.copy("/usr/bin/touch", f"{b['bin']}/uwsgi")
    os.symlink(os.path.realpath("/usr/bin/python3"), f"{b['bin']}/php-fpm8.2")
    try:
        yield b
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=120)


def status(state: str) -> dict[str, Any]:
    r = procs.run(["agent", "status", "--state-dir", state], timeout=20)
    return json.loads(r.stdout) if r.stdout.strip() else {}


def start_agent(
    tmp: Path, url: str, watch: str, conf: str = FAST, prefix: Sequence[str] = (), extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``agent run`` (``prefix``: a command it runs under, such as unshare;
    ``extra``: more options), once its status says running."""
    state = str(tmp / "agent")
    cfg = tmp / "agent.conf"
    cfg.write_text(conf)
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    with open(tmp / "agent.log", "ab") as log:
        p = subprocess.Popen(
            [
                *prefix,
                *procs.RAREWRITE,
                "agent",
                "run",
                "--collector",
                url,
                "--state-dir",
                state,
                "--watch",
                watch,
                "--config",
                str(cfg),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if status(state).get("state") == "running":
            return p, state, cfg
        assert p.poll() is None, (tmp / "agent.log").read_text()[-2000:]
        time.sleep(0.2)
    procs.stop(p)
    raise AssertionError("agent never said running: " + (tmp / "agent.log").read_text()[-2000:])


def wait_rows(db: str, want: set[tuple[str, str, int]], timeout: float = 30) -> set[tuple[str, str, int]]:
    deadline = time.monotonic() + timeout
    got: set[tuple[str, str, int]] = set()
    while time.monotonic() < deadline:
        got = {
            (r["process.executable"], r["file.path"], r["cc"])
            for r in procs.evaluate(db, time.time_ns() // 10**6 + 1)
        }
        if want <= got:
            break
        time.sleep(0.3)
    return got


def test_only_web_server_writes_come_out(site: dict[str, str], tmp_path: Path) -> None:
    www, binp, py = site["www"], site["bin"], os.path.realpath("/usr/bin/python3")
    nginx = f"{binp}/nginx"
    with procs.collector(str(tmp_path)) as c:
        agent, state, _ = start_agent(tmp_path, c.url, www)
        try:
            st = status(state)
            assert st["backend"] == "fanotify" and st["marked"]
            assert {"seen", "matched", "overflows", "dropped"} <= set(st["counters"])
            sh(*AS_WWW, nginx, "-c", f": > {www}/shell.php; sleep 0.5")
            sh(
                *AS_WWW,
                f"{binp}/php-fpm8.2",
                "-c",
                f"import os; open('{www}/up.tmp','w').close(); os.rename('{www}/up.tmp', '{www}/cmd.php')",
            )
            sh(nginx, "-c", f": > {www}/root-owned.txt")
            sh(*AS_WWW, f"{binp}/notweb", "-c", f": > {www}/notweb.txt")
            sh(*AS_WWW, nginx, "-c", f": > {site['out']}/outside.php")
            sh(*AS_WWW, nginx, "-c", f"for i in 1 2 3 4 5 6; do : > {www}/busy.log; rm {www}/busy.log; done")
            sh(*AS_WWW, f"{binp}/uwsgi", f"{www}/quick.php")
            want = {
                (nginx, f"{www}/shell.php", 1),
                (py, f"{www}/up.tmp", 1),
                (py, f"{www}/cmd.php", 1),
                (f"{binp}/uwsgi", f"{www}/quick.php", 1),
            }
            got = wait_rows(c.db, want)
            assert got == want
            deadline = time.monotonic() + 10
            while (st := status(state))["counters"]["matched"] < 10 and time.monotonic() < deadline:
                time.sleep(0.3)  # status is written once a second
            assert st["counters"]["matched"] == 10  # 4 rows + busy.log six times
            assert st["collector_reachable"] is True and st["last_shipment_ms"]
        finally:
            assert procs.stop(agent) == 0  # SIGTERM: flush and exit 0
        assert status(state)["state"] == "stopped"


def test_sighup_reloads_the_rule_and_a_bad_config_changes_nothing(
    site: dict[str, str], tmp_path: Path
) -> None:
    www, nginx = site["www"], f"{site['bin']}/nginx"
    with procs.collector(str(tmp_path)) as c:
        agent, _, cfg = start_agent(tmp_path, c.url, www)
        try:
            cfg.write_text(FAST + "[rule]\nprocess_names =\n    php-*\n")
            agent.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            sh(*AS_WWW, nginx, "-c", f": > {www}/after-reload.php")
            cfg.write_text(FAST + "[rule]\nwindow = whenever\n")
            agent.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            sh(*AS_WWW, f"{site['bin']}/php-fpm8.2", "-c", f"open('{www}/php.php','w').close()")
            sh(*AS_WWW, nginx, "-c", f": > {www}/still-old.php")
            py = os.path.realpath("/usr/bin/python3")
            got = wait_rows(c.db, {(py, f"{www}/php.php", 1)})
            assert agent.poll() is None
            assert {r[1] for r in got} == {f"{www}/php.php"}
            assert "reload_rejected" in (tmp_path / "agent.log").read_text()
        finally:
            procs.stop(agent)


@pytest.mark.slow
def test_a_burst_in_a_deep_tree_loses_nothing(site: dict[str, str], tmp_path: Path) -> None:
    www, n_dirs, per_dir = site["www"], 100, 200
    writer = (
        "import os\n"
        f"root = '{www}/burst'\n"
        f"for d in range({n_dirs}):\n"
        "    p = os.path.join(root, *[f'd{d}'] + ['x'] * (d % 8))\n"
        "    os.makedirs(p)\n"
        f"    for i in range({per_dir}):\n"
        "        open(os.path.join(p, f'f{i}.php'), 'w').close()\n"
    )
    with procs.collector(str(tmp_path)) as c:
        agent, state, _ = start_agent(tmp_path, c.url, www)
        try:
            sh(*AS_WWW, f"{site['bin']}/php-fpm8.2", "-c", writer)
            dirs = sum(len(dirs) for _, dirs, _ in os.walk(f"{www}/burst")) + 1
            files = n_dirs * per_dir
            deadline = time.monotonic() + 60
            st: dict[str, Any] = {}
            while time.monotonic() < deadline:
                st = status(state)
                if st["counters"]["matched"] >= files + dirs or st["counters"]["overflows"]:
                    break
                time.sleep(0.5)
            counters = st["counters"]
            if counters["overflows"] == 0:
                assert counters["matched"] == files + dirs, counters
            else:  # the kernel dropped events: the loss is reported, never silent
                assert counters["matched"] < files + dirs
        finally:
            procs.stop(agent)


def test_sigterm_in_a_burst_stores_what_was_read(site: dict[str, str], tmp_path: Path) -> None:
    """A burst waits in the read-ahead until it eases (up to 3 s): a SIGTERM
    just after it must still store every event the agent had read."""
    www, files = site["www"], 50_000
    writer = (
        "import os\n"
        f"root = '{www}/term'\n"
        "os.makedirs(root)\n"
        f"for i in range({files}):\n"
        "    open(os.path.join(root, f'f{i}.php'), 'w').close()\n"
    )
    with procs.collector(str(tmp_path)) as c:
        agent, state, _ = start_agent(tmp_path, c.url, www)
        try:
            sh(*AS_WWW, f"{site['bin']}/php-fpm8.2", "-c", writer)
            time.sleep(0.1)  # the reader has taken the kernel's queue; most of the burst still waits
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0
        finally:
            procs.stop(agent)
        counters = json.loads((Path(state) / "status.json").read_text())["counters"]
        assert counters["overflows"] == 0
        assert counters["stored"] == files + 1, counters  # the files and their directory


PRCTL = (
    "import ctypes, time; open({f!r}, 'w').close(); ctypes.CDLL(None).prctl(15, b'innocent', 0, 0, 0);"
    " time.sleep(1)"
)
DROP = "import os, time; open({f!r}, 'w').write('1\\n'); os.setgid(33); os.setuid(33); time.sleep(1)"


def alert_events(alerts: Path) -> dict[str, dict[str, Any]]:
    """file.path -> the original event of its alert, from the alerts file."""
    out: dict[str, dict[str, Any]] = {}
    if alerts.exists():
        for line in alerts.read_text(encoding="ascii").splitlines():
            doc = json.loads(line)
            if doc["rarewrite"].get("events"):  # health alerts have none
                out[doc["file"]["path"]] = doc["rarewrite"]["events"][0]
    return out


def deep_dir(top: str, levels: int = 20) -> str:
    """A chain of 250-byte directory names under ``top``, owned by www-data at
    the bottom; its path is past PATH_MAX, so it is made a level at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for i in range(levels):
            names.append(f"{i:02d}" + "d" * 248)
            os.mkdir(names[-1], dir_fd=fd)
            nxt = os.open(names[-1], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.fchown(fd, 33, 33)
    finally:
        os.close(fd)
    return "/".join(names)


def test_a_writer_is_judged_as_it_was_at_the_write(site: dict[str, str], tmp_path: Path) -> None:
    """Write-then-exec and write-then-rename still come out as the web
    server's; a server that creates as root and then drops to www-data does
    not become www-data's; a file deeper than PATH_MAX is named in full."""
    www, binp, py = site["www"], site["bin"], os.path.realpath("/usr/bin/python3")
    nginx = f"{binp}/nginx"
    os.symlink(py, f"{binp}/lighttpd")
    chain = deep_dir(www)
    long_path = f"{www}/{chain}/shell.php"
    alerts = tmp_path / "alerts.ndjson"
    extra = ("--schedule", "continuous", "--settle", "1s", "--alerts-file", str(alerts))
    with procs.collector(str(tmp_path), *extra) as c:
        agent, _, _ = start_agent(tmp_path, c.url, www)
        try:
            sh(*AS_WWW, nginx, "-c", f": > {www}/then-exec.php; exec sleep 0.5")
            sh(*AS_WWW, f"{binp}/php-fpm8.2", "-c", PRCTL.format(f=f"{www}/then-renamed.php"))
            sh(f"{binp}/lighttpd", "-c", DROP.format(f=f"{www}/lighttpd.pid"))
            deeper = f"import os, time; os.chdir({www!r}); [os.chdir(d) for d in {chain.split('/')!r}];"
            sh(
                *AS_WWW,
                f"{binp}/php-fpm8.2",
                "-c",
                deeper + " open('shell.php', 'w').close(); time.sleep(0.5)",
            )
            want = {
                (nginx, f"{www}/then-exec.php", 1),
                (py, f"{www}/then-renamed.php", 1),
                (py, long_path, 1),
            }
            got = wait_rows(c.db, want)
            deadline = time.monotonic() + 15
            while len(evs := alert_events(alerts)) < len(want) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            assert procs.stop(agent) == 0
    assert got == want  # and no lighttpd.pid: root created it, www-data came after
    assert evs[f"{www}/then-exec.php"]["process.name"] == "nginx"
    renamed = evs[f"{www}/then-renamed.php"]
    assert renamed["process.name"] == "php-fpm8.2", renamed
    assert renamed["rarewrite.attribution"] in ("uncertain", "exact")  # exact: read before the prctl
    assert long_path in evs and len(long_path) > 4096
