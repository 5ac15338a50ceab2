"""sd_notify and the watchdog, against a real unix datagram socket standing in
for systemd's; and the real agent and collector telling it READY=1,
WATCHDOG=1 and STOPPING=1."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.shared.clock import FakeClock
from agent.shared.systemd import Watchdog, notify
from tests.support import procs


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    try:
        yield path, s
    finally:
        s.close()


def _messages(s: socket.socket, until: str, timeout: float = 30) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(s.recv(4096).decode())
        except socket.timeout:
            break
        if got[-1] == until:
            break
    return got


def test_notify_reaches_the_socket_and_is_a_no_op_without_one(manager: tuple[str, socket.socket]) -> None:
    path, s = manager
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert s.recv(100) == b"READY=1"
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "relative/not-allowed"})


def test_notify_to_a_missing_socket_says_false_and_raises_nothing(tmp_path: Path) -> None:
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})


def test_the_abstract_namespace_is_spelled_with_an_at() -> None:
    name = f"rw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"


def test_the_watchdog_kicks_at_half_its_interval(manager: tuple[str, socket.socket]) -> None:
    path, s = manager
    clock = FakeClock()
    dog = Watchdog(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert dog.interval_s == 2.0
    dog.kick()
    dog.kick()  # too soon: nothing
    clock.advance(2.0)
    dog.kick()
    s.settimeout(0.5)
    assert _messages(s, until="") == ["WATCHDOG=1", "WATCHDOG=1"]


def test_a_watchdog_meant_for_another_pid_stays_silent() -> None:
    dog = Watchdog(FakeClock(), {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert dog.interval_s is None
    assert Watchdog(FakeClock(), {}).interval_s is None


def _serve(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = procs.free_port()
    log = open(tmp / "collector.log", "ab")
    p = subprocess.Popen(
        [*procs.RAREWRITE, "collector", "serve", "--listen", f"127.0.0.1:{port}", "--db", str(tmp / "c.db")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    return p, f"http://127.0.0.1:{port}"


def test_the_collector_says_ready_once_it_listens_and_stopping_at_sigterm(
    manager: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, s = manager
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET, "NOTIFY_SOCKET": path}
    env["WATCHDOG_USEC"] = "1000000"
    p, url = _serve(tmp_path, env)
    try:
        first = _messages(s, until="READY=1")
        assert first[-1:] == ["READY=1"], first
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:  # noqa: S310 - loopback
            assert r.status == 200  # READY came after the socket was listening
        assert "WATCHDOG=1" in _messages(s, until="WATCHDOG=1", timeout=5)
    finally:
        procs.stop(p)
    assert "STOPPING=1" in _messages(s, until="STOPPING=1", timeout=5)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fanotify")
def test_the_agent_says_ready_with_its_marks_placed_and_kicks_the_watchdog(
    manager: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, s = manager
    watch = tmp_path / "www"
    watch.mkdir()
    with procs.collector(str(tmp_path)) as c:
        env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET, "NOTIFY_SOCKET": path}
        env["WATCHDOG_USEC"] = "1000000"
        state = str(tmp_path / "agent")
        log = open(tmp_path / "agent.log", "ab")
        agent = subprocess.Popen(
            [*procs.RAREWRITE, "agent", "run", "--collector", c.url, "--state-dir", state,
             "--watch", str(watch), "--backend", "fanotify"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            first = _messages(s, until="READY=1")
            assert first[-1:] == ["READY=1"], (tmp_path / "agent.log").read_text()[-2000:]
            kicks = _messages(s, until="WATCHDOG=1", timeout=5)
            assert "WATCHDOG=1" in kicks
            assert "fanotify started" in (tmp_path / "agent.log").read_text()  # the marks came first
        finally:
            procs.stop(agent)
        assert "STOPPING=1" in _messages(s, until="STOPPING=1", timeout=5)
