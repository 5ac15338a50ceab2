"""File facts read when an event is recorded: size, mode, owner, sha256 and
the first bytes. Bounded: a file larger than the hash limit gets no hash,
and hashing stops for a moment once a per-second byte budget is spent, so a
burst of large uploads cannot make the sensor itself the load."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Optional

from agent.sensor import longpath
from agent.shared.clock import Clock
from agent.shared.events import FileFacts

SAMPLE_BYTES = 64
BUDGET_BYTES_PER_S = 64 << 20
BUDGET_FILES_PER_S = 500  # a burst of new files gets owner and size, not a hash each


class FactsReader:
    """``reader(path)``: the facts of the file at ``path`` now (``gone`` when
    it no longer exists). At most BUDGET_FILES_PER_S files and
    BUDGET_BYTES_PER_S bytes are hashed per second of ``clock``; past that a
    file gets owner, mode and size only."""

    def __init__(self, clock: Clock, hash_max_bytes: int = 1 << 20) -> None:
        self._clock = clock
        self.hash_max_bytes = hash_max_bytes
        self._second = -1
        self._bytes = self._files = 0

    def _take(self, n: int) -> bool:
        now = int(self._clock.monotonic())
        if self._second != now:
            self._second, self._bytes, self._files = now, 0, 0
        if self._bytes + n > BUDGET_BYTES_PER_S or self._files >= BUDGET_FILES_PER_S:
            return False
        self._bytes += n
        self._files += 1
        return True

    def __call__(self, path: bytes, pre: Optional[longpath.Stat] = None) -> Optional[FileFacts]:
        """``pre``: the file's lstat already read (by the store, for the enrichment too)."""
        if not path:
            return None
        try:
            st = longpath.stat_of(path, pre)
        except OSError:
            return FileFacts(gone=True)
        facts = FileFacts(
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode) | stat.S_IFMT(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
        )
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.hash_max_bytes or not self._take(st.st_size):
            return facts
        return _hashed(path, facts, self.hash_max_bytes)


def _hashed(path: bytes, facts: FileFacts, hash_max_bytes: int) -> FileFacts:
    """``facts`` with the file's sha256 and first bytes, if it can be read
    and does not grow past ``hash_max_bytes`` while it is."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = longpath.open_file(path, flags)
    except OSError:
        return facts
    try:
        h = hashlib.sha256()
        sample = b""
        remaining = hash_max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(65536, remaining))
            if not chunk:
                break
            if len(sample) < SAMPLE_BYTES:
                sample += chunk[: SAMPLE_BYTES - len(sample)]
            h.update(chunk)
            remaining -= len(chunk)
        if remaining <= 0:  # grew past the limit while we read
            return FileFacts(facts.size, facts.mode, facts.uid, facts.gid, None, sample or None)
        return FileFacts(facts.size, facts.mode, facts.uid, facts.gid, h.hexdigest(), sample or None)
    except OSError:
        return facts
    finally:
        os.close(fd)
