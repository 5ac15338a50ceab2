"""Faults, with real processes: a live `agent run` (fanotify, as root) watches
a folder where a dash copy named nginx writes files as www-data; a real
`collector serve` takes the batches. Each test ends with every recorded
web-server write counted exactly once by `collector evaluate` (cc 1 per
file, none missing, no extras), whatever broke on the way: the collector
down or SIGKILLed, the agent SIGKILLed, a full disk, a corrupt state file.
A wrong enrollment secret must stop `agent run` with a clear message."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.support import procs, writers

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(bool(writers.can_run()), reason=writers.can_run() or "ok"),
]

# Quick retries: a fault must heal in seconds, not minutes.
AGENT_CONF = "[agent]\nship_interval = 200ms\nrequest_timeout = 2s\nbackoff_max = 2s\nlog_level = info\n"
Row = tuple[str, str, int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def w() -> Iterator[writers.Writers]:
    with writers.www_tempdir("rw-faults-") as base:
        yield writers.make_writers(base)


class Agent:
    """`rarewrite agent run` in its own process group, restartable."""

    def __init__(self, tmp: Path, url: str, state: str, watch: str, secret: str = procs.SECRET) -> None:
        self.tmp, self.url, self.state, self.watch, self.secret = tmp, url, state, watch, secret
        self.conf = tmp / "agent.conf"
        self.conf.write_text(AGENT_CONF)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.tmp / f"agent-{self.starts}.log"

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": self.secret}
        args = ["agent", "run", "--collector", self.url, "--state-dir", self.state, "--watch", self.watch]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*procs.RAREWRITE, *args, "--config", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return self.proc

    def start(self, timeout: float = 20) -> subprocess.Popen[bytes]:
        """Spawn and wait until `agent status` says this process is running."""
        p = self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("state") == "running" and st.get("pid") == p.pid:
                return p
            if p.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"agent never said running: {self.log.read_text()[-2000:]}")

    def status(self) -> dict[str, Any]:
        r = procs.run(["agent", "status", "--state-dir", self.state], timeout=20)
        try:
            doc: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            return {}
        doc["_exit"] = r.returncode
        return doc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        procs.stop(self.proc, sig)

    def stop(self) -> None:
        procs.stop(self.proc)


def rows(db: str) -> set[Row]:
    return {(r["process.executable"], r["file.path"], r["cc"]) for r in procs.evaluate(db, now_ms() + 1000)}


def wait_rows(db: str, want: set[Row], timeout: float = 30) -> set[Row]:
    """Poll `collector evaluate` until every wanted row is there; the rows."""
    deadline = time.monotonic() + timeout
    got: set[Row] = set()
    while time.monotonic() < deadline:
        got = rows(db)
        if want <= got:
            time.sleep(0.5)  # anything extra (a double count) would show now
            return rows(db)
        time.sleep(0.3)
    return got


def assert_exactly_once(got: set[Row], want: set[Row]) -> None:
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{len(want & got)}/{len(want)} exactly once; missing {sorted(missing)[:3]} "
        f"({len(missing)}), unexpected {sorted(extra)[:3]} ({len(extra)})"
    )


def burst(w: writers.Writers, tag: str, n: int = 10, linger: float = 0.3) -> set[Row]:
    paths = w.create_as_www([f"{tag}-{i:02d}.php" for i in range(n)], linger)
    return {(w.nginx, p, 1) for p in paths}


def wait_for(what: str, cond: Any, timeout: float = 15, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def stored(agent: Agent) -> int:
    return int(agent.status().get("counters", {}).get("stored", 0))


# ------------------------------------------------------------------ outages


def test_collector_down_while_the_agent_records(w: writers.Writers, tmp_path: Path) -> None:
    port = procs.free_port()
    agent = Agent(tmp_path, f"http://127.0.0.1:{port}", str(tmp_path / "state"), w.www)
    try:
        agent.start()
        want = burst(w, "offline")
        # Recorded and kept while nobody listens: the shipper fails and retries.
        wait_for("the agent to store the writes", lambda: stored(agent) >= len(want))
        st = agent.status()
        assert st["_exit"] == 0 and st["outbox_depth"] >= len(want)
        assert st["collector_reachable"] is False and st["last_error"]
        with procs.collector(str(tmp_path), port=port) as c:
            want |= burst(w, "online")
            assert_exactly_once(wait_rows(c.db, want), want)
            wait_for("an empty outbox", lambda: agent.status().get("outbox_depth") == 0)
    finally:
        agent.stop()


def test_agent_sigkilled_mid_stream(w: writers.Writers, tmp_path: Path) -> None:
    with procs.collector(str(tmp_path)) as c:
        agent = Agent(tmp_path, c.url, str(tmp_path / "state"), w.www)
        want: set[Row] = set()
        try:
            agent.start()
            for k in range(3):
                want |= burst(w, f"kill{k}", n=15, linger=0.2)
                time.sleep(0.1 + 0.3 * k)  # somewhere in the record / lease / send / ack cycle
                agent.kill(signal.SIGKILL)
                st = agent.status()
                assert st["_exit"] != 0 and st["state"] == "stopped", st
                agent.start()
            assert_exactly_once(wait_rows(c.db, want), want)
        finally:
            agent.stop()


def test_collector_sigkilled_mid_batch_and_restarted(w: writers.Writers, tmp_path: Path) -> None:
    port = procs.free_port()
    db = str(tmp_path / "collector.db")
    agent = Agent(tmp_path, f"http://127.0.0.1:{port}", str(tmp_path / "state"), w.www)
    want: set[Row] = set()
    with contextlib.ExitStack() as stack:
        stack.callback(agent.stop)
        c = stack.enter_context(procs.collector(str(tmp_path), port=port, db=db))
        agent.start()
        want |= burst(w, "first")
        wait_rows(db, want)
        for k in range(2):
            want |= burst(w, f"before-kill{k}", n=15, linger=0.1)
            time.sleep(0.05 + 0.2 * k)  # the agent is sending these now
            procs.stop(c.proc, signal.SIGKILL)
            want |= burst(w, f"outage{k}", n=10, linger=0.1)  # writes go on during the outage
            c = stack.enter_context(procs.collector(str(tmp_path), port=port, db=db))
        assert_exactly_once(wait_rows(db, want), want)
        assert agent.status()["_exit"] == 0


# ------------------------------------------------------------------ full disk


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """A filler file that takes every free byte of the file system."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (64 << 10, 4096, 512):  # the last partial pages too
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    assert os.statvfs(path).f_bavail == 0
    return filler


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:  # noqa: S310 - loopback
        return str(r.read().decode())


def test_full_disk_is_counted_reported_and_recovered(w: writers.Writers, tmp_path: Path) -> None:
    with procs.collector(str(tmp_path)) as c, tmpfs(tmp_path / "small", "4m") as small:
        agent = Agent(tmp_path, c.url, str(small / "state"), w.www)
        filler: Optional[Path] = None
        try:
            agent.start()
            want = burst(w, "before-full")
            assert_exactly_once(wait_rows(c.db, want), want)
            filler = fill(small)
            lost = burst(w, "while-full", n=20)
            time.sleep(1.0)
            st = agent.status()
            assert st["_exit"] == 0 and st["state"] == "running", st  # still up
            assert agent.proc is not None and agent.proc.poll() is None
            filler.unlink()
            filler = None
            want |= burst(w, "after-free")
            got = wait_rows(c.db, want)
            # What was written while the disk was full may be lost, never more than that.
            assert want <= got and got - want <= lost, sorted(got - want - lost)[:3]
            st = wait_for(
                "the status to show what was not stored",
                lambda: (s := agent.status()).get("counters", {}).get("dropped", 0) > 0 and s,
            )
            not_delivered = len(lost - got)
            assert st["counters"]["dropped"] >= not_delivered, st["counters"]
            # The loss reaches the collector as a gap: this host is not silently "rare".
            text = wait_for(
                "a disk_full gap at the collector", lambda: 'reason="disk_full"' in metrics(c.url)
            )
            assert text
        finally:
            if filler is not None:
                with contextlib.suppress(OSError):
                    filler.unlink()
            agent.stop()


# ------------------------------------------------------------------ corrupt state


def test_corrupt_state_is_moved_aside_and_the_agent_starts_fresh(w: writers.Writers, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with procs.collector(str(tmp_path)) as c:
        agent = Agent(tmp_path, c.url, str(state), w.www)
        try:
            agent.start()
            want = burst(w, "old")
            wait_rows(c.db, want)
            agent.stop()
            db = state / "agent.db"
            size = max(db.stat().st_size, 8192)
            db.write_bytes(os.urandom(size))
            agent.start()
            aside = glob.glob(str(state / "agent.db.corrupt-*"))
            assert aside, sorted(os.listdir(state))
            assert "state_corrupt" in agent.log.read_text()
            want |= burst(w, "new")
            assert_exactly_once(wait_rows(c.db, want), want)
            # the collector was told the old file may have held unshipped events
            with contextlib.closing(sqlite3.connect(c.db)) as conn:
                reasons = {r for (r,) in conn.execute("SELECT reason FROM gaps")}
            assert "state_reset" in reasons, reasons
        finally:
            agent.stop()


# ------------------------------------------------------------------ enrollment


def test_wrong_enrollment_secret_stops_the_agent_clearly(w: writers.Writers, tmp_path: Path) -> None:
    with procs.collector(str(tmp_path)) as c:
        state = str(tmp_path / "state")
        args = ["agent", "run", "--collector", c.url, "--state-dir", state, "--watch", w.www]
        # No event needed: the agent enrolls at start, so a wrong secret is a startup error.
        r = procs.run([*args, "--enrollment-secret", "not-the-secret"], timeout=30)
        assert r.returncode != 0, r.stderr[-2000:]
        assert "refused enrollment" in r.stderr and "enrollment secret" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert Agent(tmp_path, c.url, state, w.www).status()["state"] == "stopped"
