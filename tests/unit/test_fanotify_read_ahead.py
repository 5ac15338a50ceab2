"""The fanotify reader thread and the directory scope cache, without the kernel.

The reader drains any non-blocking fd, so a pipe stands in for the fanotify
group here; the real group is exercised by tests/contract/test_sources.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from agent.sensor.sources.fanotify import reader
from agent.sensor.sources.fanotify import source as fan
from agent.shared.clock import SystemClock


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def _take_all(ahead: reader.ReadAhead, want: int, timeout: float = 5.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += b"".join(buf for _, buf in ahead.take(0.1, 1 << 20))
    return got


def test_everything_written_comes_out_in_order() -> None:
    r, w = _pipe()
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    try:
        data = bytes(range(256)) * 1000
        for i in range(0, len(data), 4096):
            os.write(w, data[i : i + 4096])
        assert _take_all(ahead, len(data)) == data
        assert ahead.pending_bytes() == 0
    finally:
        ahead.stop()
        os.close(r)
        os.close(w)


def test_a_full_read_ahead_pauses_reading_and_loses_nothing() -> None:
    r, w = _pipe()
    os.set_blocking(w, False)
    ahead = reader.ReadAhead(r, SystemClock(), max_bytes=8192)
    ahead.start()
    try:
        written = b""
        for i in range(64):  # 64 KiB: the pipe and the read-ahead cannot hold it all at once
            chunk = bytes([i]) * 1024
            try:
                os.write(w, chunk)
            except BlockingIOError:
                break
            written += chunk
        time.sleep(0.3)
        # paused at the bound: at most one buffer past it
        assert ahead.pending_bytes() <= 8192 + reader.READ_BUFFER
        assert _take_all(ahead, len(written)) == written
    finally:
        ahead.stop()
        os.close(r)
        os.close(w)


def test_take_waits_at_most_its_timeout_and_stop_joins() -> None:
    r, w = _pipe()
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    t0 = time.monotonic()
    assert ahead.take(0.2, 1 << 20) == []
    assert 0.15 <= time.monotonic() - t0 < 2.0
    ahead.stop()
    assert not ahead._thread.is_alive()
    os.close(r)
    os.close(w)


def test_read_errors_are_counted_not_raised() -> None:
    r, w = _pipe()
    os.close(w)
    os.close(r)  # reading a closed fd: EBADF, again and again
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    try:
        deadline = time.monotonic() + 3
        while ahead.read_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ahead.read_errors >= 1 and isinstance(ahead.last_error, OSError)
    finally:
        ahead.stop()


@pytest.mark.parametrize(
    ("directory", "want"),
    [
        (b"/srv/www", fan._MIXED),  # an excluded dir below it
        (b"/srv/www/a", fan._IN),
        (b"/srv/www/a/b", fan._IN),
        (b"/srv", fan._MIXED),  # /srv/www itself may be created in it
        (b"/", fan._MIXED),
        (b"/srv/wwwx", fan._OUT),
        (b"/etc", fan._OUT),
        (b"/srv/www/cache", fan._OUT),  # excluded
        (b"/srv/www/cache/x", fan._OUT),
        (b"/srv/www/up", fan._MIXED),  # an excluded dir below it
        (b"/srv/www/up/tmp", fan._OUT),
    ],
)
def test_directory_scope(directory: bytes, want: int) -> None:
    src = fan.FanotifySource([b"/srv/www"], [b"/srv/www/cache", b"/srv/www/up/tmp"], clock=SystemClock())
    assert src._dir_scope(directory) == want
    # the per-name check agrees wherever the directory says all or nothing
    if want != fan._MIXED:
        for name in (b"x.php", b"cache", b"tmp"):
            assert src._in_scope(directory.rstrip(b"/") + b"/" + name) == (want == fan._IN)


def _feeder(w: int, chunk: int, every_s: float, for_s: float, written: list[int]) -> threading.Thread:
    def run() -> None:
        end = time.monotonic() + for_s
        while time.monotonic() < end:
            written.append(os.write(w, b"x" * chunk))
            time.sleep(every_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_burst_is_left_to_gather_until_it_eases() -> None:
    r, w = _pipe()
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    try:
        written: list[int] = []
        feeder = _feeder(w, 16 << 10, 0.005, 0.4, written)  # ~3 MiB/s: a burst
        time.sleep(0.05)
        got = b"".join(buf for _, buf in ahead.take(1.0, 64 << 20))
        feeder_was_done = not feeder.is_alive()
        feeder.join()
        # handed on once the feeder stopped, nearly all of it in one go
        assert feeder_was_done or len(got) >= sum(written) - (64 << 10)
        assert len(got) >= sum(written) - (64 << 10)
    finally:
        ahead.stop()
        os.close(r)
        os.close(w)


def test_a_burst_waits_no_longer_than_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "DEFER_MAX_S", 0.3)
    r, w = _pipe()
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    try:
        feeder = _feeder(w, 16 << 10, 0.005, 1.5, [])
        time.sleep(0.05)
        t0 = time.monotonic()
        got = ahead.take(1.0, 64 << 20)
        waited = time.monotonic() - t0
        assert got and 0.2 <= waited < 1.0  # did not wait for the 1.5 s burst to end
        feeder.join()
    finally:
        ahead.stop()
        os.close(r)
        os.close(w)


def test_a_trickle_is_handed_on_at_once() -> None:
    r, w = _pipe()
    ahead = reader.ReadAhead(r, SystemClock())
    ahead.start()
    try:
        os.write(w, b"one event")
        t0 = time.monotonic()
        got = b""
        while not got and time.monotonic() - t0 < 2:
            got = b"".join(buf for _, buf in ahead.take(0.5, 1 << 20))
        assert got == b"one event" and time.monotonic() - t0 < 0.1
    finally:
        ahead.stop()
        os.close(r)
        os.close(w)


def test_the_read_ahead_holds_only_seconds_of_the_consumers_work() -> None:
    """A slow consumer (an agent under its CPU quota) shrinks the bound to
    MAX_BACKLOG_S of its measured rate: what it keeps is never further behind."""

    class Clock(SystemClock):
        t = 1000.0

        def monotonic(self) -> float:
            return self.t

    clock = Clock()
    ahead = reader.ReadAhead(-1, clock, max_bytes=64 << 20)
    assert ahead.limit() == 64 << 20  # nothing measured yet: the byte bound
    with ahead._cond:
        for _ in range(8):
            ahead._bufs.append((0, b"x" * (256 << 10)))
            ahead._bytes += 256 << 10
    for _ in range(8):  # 256 KiB taken, then 1 s of work on it: 256 KiB/s
        assert ahead.take(0, 256 << 10)
        clock.t += 1.0
    ahead._measure()
    assert ahead.limit() == int(256 * 1024 * reader.MAX_BACKLOG_S)
    clock.t += 0.001  # a fast consumer: the bound grows back to the byte bound
    ahead._handed = (clock.t - 0.001, 256 << 10)
    for _ in range(30):
        ahead._measure()
    assert ahead.limit() == 64 << 20
