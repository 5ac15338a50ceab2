"""Pick and start the event source: fanotify, inotify, or the first that works.

fail2ban's ``backend = auto`` idea: an explicitly named backend that cannot
start is an error, said loudly; under ``auto`` it is a one-line fallback.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from agent.sensor.sources.base import EventSource
from agent.shared.clock import Clock
from agent.shared.errors import SourceError

if TYPE_CHECKING:
    from agent.sensor.containers import Containers

log = logging.getLogger("rarewrite.sources.auto")

BACKENDS = ("auto", "fanotify", "inotify")


def open_source(
    backend: str,
    watch: Sequence[bytes],
    exclude: Sequence[bytes],
    ignore: Sequence[bytes],
    own_pid: Optional[int],
    clock: Clock,
    flood_rate: Optional[int] = None,
    containers: Optional[Containers] = None,
) -> EventSource:
    """Return a started source; SourceError when none can start. ``own_pid``
    is the agent's (fanotify drops its events; inotify has no pid and keeps
    the agent's writes out with ``ignore``). ``flood_rate``: fanotify mutes a
    directory past this many events a second (0: never; None: the default)."""
    if backend not in BACKENDS:
        raise SourceError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in ("fanotify", "auto"):
        try:
            return _start(_fanotify(watch, exclude, ignore, own_pid, clock, flood_rate, containers))
        except SourceError as exc:
            if backend == "fanotify":
                log.error("source failed backend=fanotify reason=%s", exc)
                raise
            log.warning("fallback from=fanotify to=inotify reason=%s", exc)
    try:
        return _start(_inotify(watch, exclude, ignore, clock))
    except SourceError as exc:
        log.error("source failed backend=inotify reason=%s", exc)
        raise


def _start(source: EventSource) -> EventSource:
    try:
        source.start()
    except SourceError:
        source.close()
        raise
    except OSError as exc:
        source.close()
        raise SourceError(f"{source.name}: {exc}") from exc
    return source


def _fanotify(
    watch: Sequence[bytes],
    exclude: Sequence[bytes],
    ignore: Sequence[bytes],
    own_pid: Optional[int],
    clock: Clock,
    flood_rate: Optional[int] = None,
    containers: Optional[Containers] = None,
) -> EventSource:
    from agent.sensor.sources.fanotify.flood import FloodGuard
    from agent.sensor.sources.fanotify.source import FanotifySource

    flood = FloodGuard(flood_rate) if flood_rate is not None else None
    return FanotifySource(
        watch, exclude, ignore=ignore, own_pid=own_pid, clock=clock, flood=flood, containers=containers
    )


def _inotify(
    watch: Sequence[bytes], exclude: Sequence[bytes], ignore: Sequence[bytes], clock: Clock
) -> EventSource:
    try:  # an optional backend: pyinotify may be absent
        inotify_mod = importlib.import_module("agent.sensor.sources.inotify")
    except ImportError as exc:  # the module or pyinotify missing
        raise SourceError(f"inotify unavailable: {exc}") from exc
    source: EventSource = inotify_mod.InotifySource(watch, exclude, ignore=ignore, clock=clock)
    return source
