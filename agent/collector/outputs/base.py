"""The Output protocol and the queued output that webhook and syslog share: a
memory queue a background thread delivers, with retries and backoff."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional, Protocol, runtime_checkable

from agent.shared.backoff import Backoff
from agent.shared.clock import Clock, SystemClock

log = logging.getLogger("rarewrite.collector.outputs")
DRAIN_S = 5.0  # how long close() lets a queued output deliver what is left
DROP_LOG_EVERY_S = 60.0
RETRY_AFTER_MAX_S = 3600.0


class Output(Protocol):
    name: str

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Deliver one batch of alert documents; raise OSError on failure."""

    def close(self) -> None: ...


@runtime_checkable
class Dropping(Protocol):
    """An output that can drop alerts (a bounded queue) and counts them."""

    name: str
    dropped: int


class Retry(Exception):
    """A delivery that may work later; ``after`` is the receiver's Retry-After."""

    def __init__(self, reason: str, after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


class Permanent(Exception):
    """A delivery that will never work (the receiver refused this alert)."""


class QueuedOutput:
    """A bounded queue drained by one background thread.

    ``emit`` never blocks on the network. Up to ``queue_max`` alerts wait;
    one more may be in flight. A full queue drops its oldest waiting alert
    and counts it in ``dropped``. A failed delivery (:class:`Retry`) is
    retried, oldest first, after a :class:`~agent.shared.backoff.Backoff` delay
    from 0.5 s up to ``backoff_max`` (or the receiver's Retry-After); a
    :class:`Permanent` failure is logged, counted in ``failed`` and skipped.
    Subclasses implement :meth:`deliver` and may override :meth:`disconnect`.
    """

    kind = "queued"

    def __init__(
        self, name: str, queue_max: int, backoff_max_s: float, clock: Optional[Clock] = None
    ) -> None:
        self.name = name
        self._clock: Clock = clock or SystemClock()
        self._backoff = Backoff(0.5, backoff_max_s)
        self.queue_max = queue_max
        self.backoff_max_s = backoff_max_s
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.retries = 0
        self._q: deque[dict[str, Any]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._wake = threading.Event()
        self._last_drop_log = -DROP_LOG_EVERY_S
        self._drops_unlogged = 0
        self._thread = threading.Thread(target=self._run, name=f"rw-output-{name}", daemon=True)
        self._thread.start()

    # the interface

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        dropped = 0
        with self._cv:
            if self._closing:
                raise OSError(f"output {self.name} is closed")
            for a in alerts:
                if len(self._q) >= self.queue_max:
                    self._q.popleft()
                    dropped += 1
                self._q.append(a)
            self.dropped += dropped
            self._cv.notify()
        if dropped:
            self._log_drops(dropped)

    def pending(self) -> int:
        with self._cv:
            return len(self._q)

    def counters(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "failed": self.failed, "retries": self.retries}

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._wake.set()
        self._thread.join(DRAIN_S)
        left = self.pending()
        if self._thread.is_alive() or left:
            log.warning(
                "event=output_closed_undelivered output=%r type=%s undelivered=%d", self.name, self.kind, left
            )
        self.disconnect()

    # for subclasses

    def deliver(self, alert: dict[str, Any]) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        return None

    # the worker

    def _log_drops(self, n: int) -> None:
        now = self._clock.monotonic()
        with self._cv:
            self._drops_unlogged += n
            if now - self._last_drop_log < DROP_LOG_EVERY_S:
                return
            n, self._drops_unlogged, self._last_drop_log = self._drops_unlogged, 0, now
        log.warning(
            "event=output_queue_full output=%r type=%s dropped=%d dropped_total=%d queue_max=%d",
            self.name,
            self.kind,
            n,
            self.dropped,
            self.queue_max,
        )

    def _run(self) -> None:
        item: Optional[dict[str, Any]] = None
        attempt = 0
        while True:
            with self._cv:
                while item is None and not self._q:
                    if self._closing:
                        return
                    self._cv.wait()
                if item is None:
                    item = self._q.popleft()
            try:
                self.deliver(item)
            except Retry as e:
                self.retries += 1
                if attempt == 0:
                    log.warning(
                        "event=output_retrying output=%r type=%s reason=%r", self.name, self.kind, e.reason
                    )
                delay = min(e.after, RETRY_AFTER_MAX_S) if e.after is not None else self._backoff.next_delay()
                attempt += 1
                if self._closing:
                    return  # closing and the receiver still fails: what is left stays undelivered
                self._wake.wait(delay)
                continue
            except Permanent as e:
                self.failed += 1
                log.error("event=output_refused output=%r type=%s reason=%r", self.name, self.kind, str(e))
            except Exception as e:  # a bug must not kill the thread and silently stop the output
                self.failed += 1
                log.exception("event=output_error output=%r type=%s error=%r", self.name, self.kind, str(e))
            else:
                self.sent += 1
                if attempt:
                    log.info(
                        "event=output_recovered output=%r type=%s attempts=%d", self.name, self.kind, attempt
                    )
            item = None
            attempt = 0
            self._backoff.reset()
