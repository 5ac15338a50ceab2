"""The interface every event source implements.

Backpressure: a source buffers little of its own (fanotify reads ahead into
a bounded buffer, see ``READ_AHEAD_BYTES``). If the consumer does not call
:meth:`EventSource.read` often enough the kernel queue fills; a bounded queue
then drops events and the source reports the loss as an ``overflow``
:class:`~agent.shared.events.RawEvent` (and in :meth:`stats`). Lost events are
counted, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from agent.shared.events import RawEvent


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
        """Counters and coverage: filesystems marked and refused, overflows,
        unresolvable handles, events seen in scope."""

    def close(self) -> None:
        """Remove marks, close descriptors. Safe to call twice."""


def in_scope(path: bytes, watch: Sequence[bytes], exclude: Sequence[bytes]) -> bool:
    """True when ``path`` lies under a watch prefix and under no exclude prefix.

    Prefixes match whole path components: ``/srv/www`` covers ``/srv/www`` and
    ``/srv/www/a`` but not ``/srv/wwwx``.
    """
    return any(_under(path, w) for w in watch) and not any(_under(path, x) for x in exclude)


def _under(path: bytes, prefix: bytes) -> bool:
    if prefix == b"/":
        return path.startswith(b"/")
    return path == prefix or path.startswith(prefix.rstrip(b"/") + b"/")
