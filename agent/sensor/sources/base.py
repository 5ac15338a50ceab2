"""The interface every event source implements.

Backpressure: a source buffers little of its own (fanotify reads ahead into
a bounded buffer, see ``READ_AHEAD_BYTES``). If the consumer does not call
:meth:`EventSource.read` often enough the kernel queue fills; a bounded queue
then drops events and the source reports the loss as an ``overflow``
:class:`~agent.shared.events.RawEvent` (and in :meth:`stats`). Lost events are
counted, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, TypedDict, runtime_checkable

from agent.shared.events import RawEvent

# A prefilter answers, for a pid, (until, cannot_match): until that monotonic
# time no event of the pid can match the rule (or some may).
PrefilterFn = Callable[[int], tuple[float, bool]]


class Refused(TypedDict):
    """A place the source could not watch, in :meth:`EventSource.stats`
    ``refused``: a filesystem (fanotify) or a directory (inotify)."""

    path: str
    reason: str


class EventSource(Protocol):
    """A source of file creations, renames and (where it can) process execs."""

    name: str

    def start(self) -> None:
        """Place marks or watches. Raises SourceError when unavailable here."""

    def read(self, timeout: float) -> Sequence[RawEvent]:
        """Block up to ``timeout`` seconds; return the events read (maybe none).

        Only events inside the watch scope and outside the excludes are
        returned (exec and overflow records always are). Never raises for a
        single bad event: it is counted in :meth:`stats` instead.
        """

    def stats(self) -> dict[str, Any]:
        """Counters and coverage: at least ``marked`` (paths, str) and
        ``refused`` (:class:`Refused`), ``seen`` and ``overflows``; fanotify
        adds ``unresolved`` (handles that no longer resolve) and more."""

    def close(self) -> None:
        """Remove marks, close descriptors. Safe to call twice."""


@runtime_checkable
class Prefiltering(Protocol):
    """A source that can drop the events of a process the rule rules out
    before they are resolved (fanotify: it knows the pid of every event)."""

    def set_prefilter(self, prefilter: Optional[PrefilterFn]) -> None:
        """Install ``prefilter``; forget every cached answer (a new rule)."""

    def take_prefiltered(self) -> int:
        """Events dropped by the prefilter since the last call (they count as seen)."""


@runtime_checkable
class ReadingAhead(Protocol):
    """A source that reads ahead of :meth:`EventSource.read` (fanotify's
    read-ahead thread): at a stop, what it holds can still be drained."""

    def stop_reading(self) -> None:
        """Stop reading the kernel queue; later reads return what was read ahead."""


def in_scope(path: bytes, watch: Sequence[bytes], exclude: Sequence[bytes]) -> bool:
    """True when ``path`` lies under a watch prefix and under no exclude prefix.

    Prefixes match whole path components: ``/srv/www`` covers ``/srv/www`` and
    ``/srv/www/a`` but not ``/srv/wwwx``.
    """
    return any(under(path, w) for w in watch) and not any(under(path, x) for x in exclude)


def under(path: bytes, prefix: bytes) -> bool:
    """``path`` is ``prefix`` or inside it, by whole path components."""
    if prefix == b"/":
        return path.startswith(b"/")
    return path == prefix or path.startswith(prefix.rstrip(b"/") + b"/")
