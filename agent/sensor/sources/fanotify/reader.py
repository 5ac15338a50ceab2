"""The read-ahead thread: empties the fanotify queue in batches as fast as
the kernel fills it, and holds a burst until it eases.

A flood (code running as the web user can create files faster than the
agent resolves them) costs at most READ_AHEAD_BYTES here, and at most about
MAX_BACKLOG_S of the consumer's work (its rate is measured): whatever is
kept is never more than that behind the kernel. Past the bound
the thread stops reading and the kernel's bounded queue overflows: the
kernel drops events in the writer's context, at no cost to the agent's CPU
quota (reading events only to drop them would spend it), and queues one
overflow record, which becomes an "overflow" gap and a sensor-blind alert.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from typing import Optional

from agent.shared.clock import Clock

READ_BUFFER = 256 * 1024
# Raw events read ahead of the consumer at most (~180,000): beyond it the
# reader pauses and the kernel's queue holds, then drops (see the module doc).
READ_AHEAD_BYTES = 16 << 20
# ... and at most this many seconds of the consumer's measured work, but
# never less than MIN_AHEAD_BYTES. Long enough for a deploy-sized burst
# (110,100 events at ~70 us each is ~8 s: bench/burst.py); a flood in one
# folder is muted long before (flood.py) and its queued events are dropped
# at a few us each, so a shell behind it waits about a second.
MAX_BACKLOG_S = 30.0
MIN_AHEAD_BYTES = 1 << 20
FULL_SLICE = 128 << 10  # a take at least this large was taken from a backlog
# A burst: this much waiting at once (~700 events). Its events are left to
# gather until fewer than BURST_EASED_BYTES arrive in BURST_QUIET_S, for at
# most DEFER_MAX_S or until DEFER_MAX_BYTES wait (see ReadAhead.take).
BURST_BYTES = 64 << 10
BURST_QUIET_S = 0.02
BURST_EASED_BYTES = 8 << 10
DEFER_MAX_S = 3.0
DEFER_MAX_BYTES = 12 << 20
# 256 KiB of events (~2,700) at most per read() call: a burst is handed on in
# slices that one SQLite transaction takes. Larger slices cost no less CPU
# and leave a larger heap behind (bench/burst.py: RSS 65 MB after, not 49).
TAKE_BYTES = 1 << 18
# After a short read the reader lets events gather this long: a reader that
# takes them one by one contends with every writer for the queue's lock and
# costs the host more than one that reads nothing (bench/burst.py).
READ_BATCH_WAIT_S = 0.005


class ReadAhead:
    """A thread that empties the fanotify queue as fast as the kernel fills it.

    The kernel compares each new event with the unread ones of its hash
    bucket (to merge duplicates), so a long queue makes every write on the
    host slower. Reading ahead into user space keeps that cost at its floor
    while the consumer parses, resolves and stores at its own pace. The
    thread holds the GIL only to hand a buffer on; the events it reads carry
    no file descriptors (FID reporting), so a buffer can wait safely.
    """

    def __init__(self, fd: int, clock: Clock, max_bytes: int = READ_AHEAD_BYTES) -> None:
        self._fd = fd
        self._clock = clock
        self._max = max_bytes
        self._bufs: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._draining = False
        self.read_errors = 0
        self.last_error: Optional[OSError] = None
        self.paused = 0  # times the read-ahead was full and reading paused
        self._rate: Optional[float] = None  # bytes/s the consumer works through (EWMA)
        self._handed = (0.0, 0)  # (monotonic end of the last take, bytes it handed on)
        self._thread = threading.Thread(target=self._run, name="fanotify-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread; the caller closes the fd afterwards.
        What was read stays for :meth:`take`, handed on without deferral."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def take(self, timeout: float, max_bytes: int) -> list[tuple[int, bytes]]:
        """Buffers (read time in ms, bytes) in kernel order, up to ``max_bytes``.

        In a burst the events are left to gather until it eases: any work the
        agent does while the host writes at full speed slows the host (the
        two cores of a small VM share caches, often a physical core), so the
        agent reads at once but resolves and stores after. Bounded: at most
        ``DEFER_MAX_S`` after the oldest waiting event, or once the read-ahead
        holds ``DEFER_MAX_BYTES``.
        """
        self._measure()
        with self._cond:
            out = self._take(timeout, max_bytes)
        self._handed = (self._clock.monotonic(), sum(len(b) for _, b in out))
        return out

    def _measure(self) -> None:
        """The consumer's rate: what the last take handed on, over the time
        until this one (its work; the waits inside take do not count). Only
        a full slice counts: after a small one the consumer may have done
        anything (maintenance, a commit), and a rate taken from that would
        shrink the bound just when a burst needs it."""
        end, n = self._handed
        busy = self._clock.monotonic() - end
        if n >= FULL_SLICE and busy > 0:
            now = n / busy
            self._rate = now if self._rate is None else 0.8 * self._rate + 0.2 * now

    def limit(self) -> int:
        """Bytes the read-ahead may hold now (see MAX_BACKLOG_S)."""
        if self._rate is None:
            return self._max
        return int(min(self._max, max(MIN_AHEAD_BYTES, self._rate * MAX_BACKLOG_S)))

    def _take(self, timeout: float, max_bytes: int) -> list[tuple[int, bytes]]:
        """take's work, with the lock held."""
        cond = self._cond
        if not self._bufs and timeout > 0:
            cond.wait(timeout)
        if not self._draining and self._bytes >= BURST_BYTES:
            self._draining = True  # one wait per burst; then drain it in slices
            deadline = self._clock.monotonic() + DEFER_MAX_S
            while not self._stop and self._bytes < min(DEFER_MAX_BYTES, self.limit()):
                before = self._bytes
                left = deadline - self._clock.monotonic()
                if left <= 0:
                    break
                cond.wait(min(BURST_QUIET_S, left))
                if self._bytes - before < BURST_EASED_BYTES:
                    break
        out: list[tuple[int, bytes]] = []
        n = 0
        while self._bufs and n < max_bytes:
            item = self._bufs.popleft()
            out.append(item)
            n += len(item[1])
        if n:
            self._bytes -= n
            cond.notify_all()  # the reader may be waiting for room
        if self._bytes < BURST_BYTES:
            self._draining = False
        return out

    def pending_bytes(self) -> int:
        return self._bytes

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        cond = self._cond
        while True:
            with cond:
                if self._bytes >= self.limit() and not self._stop:
                    self.paused += 1
                    while self._bytes >= self.limit() and not self._stop:
                        cond.wait(0.5)
                if self._stop:
                    return
            try:
                buf = os.read(self._fd, READ_BUFFER)
            except BlockingIOError:
                try:
                    if poller.poll(200):
                        self._clock.sleep(READ_BATCH_WAIT_S)
                except InterruptedError:
                    pass
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                with cond:
                    self.read_errors += 1
                    self.last_error = exc
                    if self._stop:
                        return
                    cond.wait(0.5)  # never spin on a persistent error
                continue
            if not buf:
                continue
            self._keep(buf)
            if len(buf) < READ_BUFFER // 2:
                self._clock.sleep(READ_BATCH_WAIT_S)

    def _keep(self, buf: bytes) -> None:
        """Queue a read for the consumer."""
        ts = self._clock.now_ms()
        with self._cond:
            self._bufs.append((ts, buf))
            self._bytes += len(buf)
            self._cond.notify_all()
