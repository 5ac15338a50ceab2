"""sd_notify without libsystemd: READY=1, STOPPING=1 and the watchdog's
WATCHDOG=1, sent as datagrams to ``$NOTIFY_SOCKET`` (the protocol of
sd_notify(3)). Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Optional

from agent.shared.clock import Clock

log = logging.getLogger("rarewrite.systemd")


def notify(message: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``); True when a service manager got it."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr  # "@name": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warning("event=sd_notify_failed message=%r error=%r", message.partition("=")[0], str(e))
        return False
    return True


class Watchdog:
    """``WATCHDOG=1`` at half the interval systemd asks for (``$WATCHDOG_USEC``,
    for this pid if ``$WATCHDOG_PID`` names one). Call :meth:`kick` from the
    loop whose progress it vouches for; without a watchdog it does nothing."""

    def __init__(self, clock: Clock, env: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if env is None else env
        self._clock = clock
        self._env = env
        self.interval_s: Optional[float] = None
        pid = env.get("WATCHDOG_PID", "")
        usec = env.get("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval_s = int(usec) / 2e6
        self._next = 0.0

    def kick(self) -> None:
        if self.interval_s is None:
            return
        now = self._clock.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            notify("WATCHDOG=1", self._env)
