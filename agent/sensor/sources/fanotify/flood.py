"""Flood muting: a directory that floods the agent is silenced in the kernel.

Code running as the web user can create files in one directory far faster
than an agent under its CPU quota resolves them (bench/flood.py: 150,000 a
second against ~8,000). Past the queue's bound the kernel drops events at
random, so a web shell written elsewhere during the flood would most likely
be lost. Instead, while the agent is falling behind (its read-ahead half
full, or the kernel's queue overflowed: a burst it can absorb is never
muted), a directory whose events pass ``rate`` a second gets an ignore mark
for ``mute_s``: the kernel stops queueing its creations and
renames before they cost anything, the queue drains, and writes everywhere
else are seen again within seconds. The muted directory is a gap ("flood",
with its path in the agent's log), so the collector raises a sensor-blind
alert; after ``mute_s`` the mark goes and the directory is muted again at
once if the flood goes on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

FLOOD_RATE = 5000  # events a second from one directory; above an agent's whole quota
MUTE_S = 30.0


@dataclass
class Muted:
    path: bytes
    until: float  # monotonic
    since_ms: int
    flags: int  # the fanotify_mark flags the ignore mark was placed with
    mask: int
    dropped: int = 0  # its events still queued when it was muted, dropped unread


class FloodGuard:
    """Counts events per directory (by its handle key) per second of their
    *arrival* (when the reader took them from the kernel: an agent under its
    quota processes far fewer a second than arrive), and says which
    directories to mute and which mutes have run out."""

    def __init__(self, rate: int = FLOOD_RATE, mute_s: float = MUTE_S) -> None:
        self.rate = rate
        self.mute_s = mute_s
        self.muted: dict[bytes, Muted] = {}
        self._hits: Counter[bytes] = Counter()
        self._second = -1

    def count(self, key: bytes, read_ms: int) -> None:
        second = read_ms // 1000
        if second != self._second:
            self._second = second
            self._hits.clear()
        self._hits[key] += 1

    def due(self, now: float, behind: bool = True) -> tuple[list[bytes], list[tuple[bytes, Muted]]]:
        """(directory keys to mute, (key, mute) pairs to lift). Nothing is
        muted unless the agent is ``behind``: a burst it absorbs is no flood."""
        rate = self.rate
        hot = (
            [k for k, n in self._hits.items() if n >= rate and k not in self.muted]
            if behind and rate > 0
            else []
        )
        done = [(k, m) for k, m in self.muted.items() if m.until <= now]
        for k, _ in done:
            del self.muted[k]
        return hot, done
