"""inotify source: the fallback on kernels without fanotify, and for unprivileged runs.

pyinotify's ``WatchManager`` holds the watches and its ``Notifier`` (not the
threaded one) pairs rename cookies and keeps watch paths right when watched
directories move; :class:`InotifySource` drives it from :meth:`read`.

What inotify cannot do, and what this module does about it:

- **No pid.** ``RawEvent.pid`` is always ``None``; the resolver infers the
  writer from the file owner and the running web servers and marks the event
  ``inferred``. The agent's own files are kept out by the ``ignore``
  directories, which get no watch at all.
- **One watch per directory.** Watches are placed recursively at start, with
  the excludes and ignore dirs pruned *before* any watch is added. A new
  directory gets its watch when its ``IN_CREATE`` is read, which is after the
  fact: whatever was created in it meanwhile (``mkdir -p a/b/c && touch
  a/b/c/f``) has no event. So after adding the watch the source lists the new
  directory and reports every entry as a creation, descending into new
  subdirectories the same way.
- **Rescan duplicates.** An entry created after the new watch was placed but
  before the listing is seen twice: by the listing and by the watch. Every
  path the listing reported is remembered until one more complete read of
  the kernel queue has happened (any duplicate was queued before the listing,
  so it is in that read); a watch event for a remembered path is dropped. An
  ``IN_DELETE`` or ``IN_MOVED_FROM`` for the path forgets it, so a delete and
  re-create in that short time still counts twice. What the listing cannot
  tell is *how* an entry got there: a file renamed into a brand-new
  directory within that window is reported as a creation, not a rename.
- **Queue overflow.** ``IN_Q_OVERFLOW`` becomes an ``overflow`` RawEvent
  (``lost=0``: inotify does not say how many) and is counted; afterwards the
  tree is walked again to watch directories whose creation was lost (without
  reporting their contents: the gap is already on record).
- **Watch limit.** ``fs.inotify.max_user_watches`` exhausted (``ENOSPC``) is
  counted in ``stats()["watch_errors"]`` and logged once with the sysctl to
  raise; the source keeps running with the watches it has.
- **Byte paths.** pyinotify 0.9.6 decodes event names as strict UTF-8 and
  encodes watch paths strictly, so a non-UTF-8 name would raise inside it.
  This module reads the inotify descriptor itself (names decoded with
  ``os.fsdecode``, i.e. surrogateescape) and places watches with
  ``os.fsencode``: every name, including non-UTF-8 bytes and newlines,
  round-trips to the exact bytes on disk.
- **Moves out of the tree.** A watched directory moved to an unwatched place
  cannot be followed (inotify gives no destination); its watches are dropped.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import os
import struct
import termios
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from agent.sensor.libc import libc as c_library
from agent.sensor.sources.base import Refused, in_scope
from agent.shared.clock import Clock, SystemClock
from agent.shared.errors import SourceError
from agent.shared.events import CREATION, OVERFLOW, RENAME, RawEvent
from agent.shared.ratelimit import RateLimiter

log = logging.getLogger("rarewrite.sources.inotify")

LOG_INTERVAL_S = 60.0

# <sys/inotify.h>; the same values pyinotify exposes, kept here so the pure
# parts of this module (and its tests) do not need pyinotify.
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000

WATCH_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_MOVE_SELF | IN_Q_OVERFLOW

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_UNKNOWN_SUFFIX = "-unknown-path"  # what pyinotify appends to a watch it lost track of
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ESTALE)


def parse_events(buf: bytes) -> Iterator[tuple[int, int, int, str]]:
    """(wd, mask, cookie, name) for each ``struct inotify_event`` in ``buf``.

    The name is decoded with :func:`os.fsdecode`, so :func:`os.fsencode`
    gives back the exact bytes the kernel sent.
    """
    pos = 0
    end = len(buf)
    while pos + _HEADER.size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(buf, pos)
        pos += _HEADER.size
        raw = buf[pos : pos + length]
        pos += length
        yield wd, mask, cookie, os.fsdecode(raw.split(b"\0", 1)[0])


class _AddWatch:
    """inotify_add_watch(2) with ``os.fsencode`` (pyinotify encodes strictly).

    Installed in place of the pyinotify wrapper's private ``_inotify_add_watch``
    and keeps the errno of the last failure for the caller.
    """

    def __init__(self) -> None:
        libc = c_library()
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self.last_errno = 0

    def __call__(self, fd: int, pathname: str, mask: int) -> int:
        wd = int(self._add(fd, os.fsencode(pathname), mask))
        self.last_errno = ctypes.get_errno() if wd < 0 else 0
        return wd


class InotifySource:
    """File creations and renames under ``watch`` via inotify (pyinotify)."""

    name = "inotify"

    def __init__(
        self,
        watch: Sequence[bytes],
        exclude: Sequence[bytes],
        ignore: Sequence[bytes] = (),
        clock: Optional[Clock] = None,
    ) -> None:
        self._watch = [_norm(w) for w in watch]
        self._exclude = [_norm(x) for x in exclude]
        self._ignore = [_norm(x) for x in ignore]
        self._skip = self._exclude + self._ignore
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rl = RateLimiter(self._clock, interval_s=LOG_INTERVAL_S)
        self._wm: Any = None
        self._notifier: Any = None
        self._adder: Optional[_AddWatch] = None
        self._fd = -1
        self._pending: list[Any] = []  # pyinotify Events collected by process_events
        self._rescanned: dict[bytes, int] = {}  # path reported by a rescan -> read cycle
        self._cycle = 0
        self._closed = False
        self._limit_logged = False
        self._marked: list[str] = []
        self._refused: list[Refused] = []
        self._counters: dict[str, int] = {
            "seen": 0,
            "overflows": 0,
            "watch_errors": 0,
            "rescanned": 0,
            "duplicates_dropped": 0,
            "errors": 0,
        }

    # --- EventSource ------------------------------------------------------

    def start(self) -> None:
        if self._closed:
            raise SourceError("inotify: source already closed")
        try:
            import pyinotify
        except ImportError as exc:  # Python >= 3.12 also needs the pyasyncore package
            raise SourceError(
                f"inotify unavailable: cannot import pyinotify ({exc}); install python3-pyinotify "
                "(and pyasyncore on Python 3.12 and later)"
            ) from exc
        # pyinotify logs every failed watch to stderr on its own; this module
        # counts and logs those itself, rate-limited.
        logging.getLogger("pyinotify").setLevel(logging.CRITICAL)
        try:
            self._wm = pyinotify.WatchManager()
        except (OSError, pyinotify.PyinotifyError) as exc:
            raise SourceError(f"inotify unavailable: {exc}") from exc
        self._fd = int(self._wm.get_fd())
        os.set_inheritable(self._fd, False)
        self._adder = _AddWatch()
        self._wm._inotify_wrapper._inotify_add_watch = self._adder
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._pending.append)
        for root in self._watch:
            if self._skipped(root):
                self._refused.append(Refused(path=os.fsdecode(root), reason="excluded"))
                continue
            reason = self._watch_tree(os.fsdecode(root))
            if reason:
                self._refused.append(Refused(path=os.fsdecode(root), reason=reason))
            else:
                self._marked.append(os.fsdecode(root))
        if not self._marked:
            refused = ", ".join(f"{r['path']} ({r['reason']})" for r in self._refused) or "nothing to watch"
            self.close()
            raise SourceError(f"inotify: no watch could be placed: {refused}")
        log.info(
            "event=inotify_started roots=%s watches=%d watch_errors=%d",
            ",".join(self._marked),
            len(self._wm.watches),
            self._counters["watch_errors"],
        )

    def read(self, timeout: float) -> Sequence[RawEvent]:
        if self._closed or self._notifier is None:
            return []
        self._cycle += 1
        out: list[RawEvent] = []
        try:
            if self._notifier.check_events(max(0, int(timeout * 1000))):
                self._read_queue()
                self._notifier.process_events()
        except OSError as exc:
            self._counters["errors"] += 1
            self._rl.log(log, logging.ERROR, "read", "event=inotify_read_failed error=%s", exc)
        pending = self._pending[:]
        self._pending.clear()  # in place: the notifier holds its append
        for ev in pending:
            try:
                self._handle(ev, out)
            except Exception as exc:  # noqa: BLE001 - one bad event never stops the source
                self._counters["errors"] += 1
                self._rl.log(log, logging.ERROR, "handle", "event=inotify_event_failed error=%r", exc)
        # Any duplicate of a rescan made before this cycle was in this cycle's read.
        if self._rescanned:
            self._rescanned = {p: c for p, c in self._rescanned.items() if c >= self._cycle}
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "inotify", **self._counters}
        out["watches"] = len(self._wm.watches) if self._wm is not None and not self._closed else 0
        out["marked"] = list(self._marked)
        out["refused"] = list(self._refused)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        notifier, self._notifier = self._notifier, None
        try:
            if notifier is not None:
                notifier.stop()  # closes the inotify descriptor: every watch goes with it
            elif self._wm is not None:
                self._wm.close()
        except OSError as exc:
            log.warning("event=inotify_close_failed error=%s", exc)
        self._pending.clear()
        self._rescanned.clear()

    # --- reading ----------------------------------------------------------

    def _read_queue(self) -> None:
        """Read the whole kernel queue; hand the events to pyinotify."""
        import pyinotify

        size = array.array("i", [0])
        fcntl.ioctl(self._fd, termios.FIONREAD, size, True)
        if size[0] <= 0:
            return
        buf = os.read(self._fd, size[0])
        for wd, mask, cookie, name in parse_events(buf):
            self._notifier.append_event(pyinotify._RawEvent(wd, mask, cookie, name))

    def _handle(self, ev: Any, out: list[RawEvent]) -> None:
        mask = int(ev.mask)
        if mask & IN_Q_OVERFLOW:
            self._counters["overflows"] += 1
            out.append(RawEvent(kind=OVERFLOW, ts_ms=self._clock.now_ms(), path=None, lost=0))
            self._rl.log(
                log,
                logging.WARNING,
                "overflow",
                "event=inotify_queue_overflow overflows=%d",
                self._counters["overflows"],
            )
            self._rewatch()
            return
        if mask & IN_IGNORED:
            return
        pathname = str(ev.pathname)
        if mask & IN_MOVE_SELF:
            if pathname.endswith(_UNKNOWN_SUFFIX):
                self._drop_tree(int(ev.wd), pathname[: -len(_UNKNOWN_SUFFIX)])
            return
        path = os.fsencode(pathname)
        is_dir = bool(mask & IN_ISDIR)
        if mask & (IN_DELETE | IN_MOVED_FROM):
            self._rescanned.pop(path, None)
            return
        if not mask & (IN_CREATE | IN_MOVED_TO):
            return
        if self._rescanned.pop(path, None) is not None:
            self._counters["duplicates_dropped"] += 1
            return
        if self._skipped(path):
            return
        if mask & IN_CREATE:
            self._emit(out, RawEvent(kind=CREATION, ts_ms=self._clock.now_ms(), path=path, is_dir=is_dir))
            if is_dir:
                self._adopt(pathname, out)
            return
        src = getattr(ev, "src_pathname", None)
        original = os.fsencode(src) if isinstance(src, str) else None
        self._emit(
            out,
            RawEvent(
                kind=RENAME, ts_ms=self._clock.now_ms(), path=path, original_path=original, is_dir=is_dir
            ),
        )
        if is_dir and original is None:
            # Moved in from outside the watched tree: pyinotify keeps no watch
            # for it, so place them; its contents were not created here.
            self._watch_tree(pathname)

    def _emit(self, out: list[RawEvent], ev: RawEvent) -> None:
        if ev.path is not None and not in_scope(ev.path, self._watch, self._skip):
            return
        self._counters["seen"] += 1
        out.append(ev)

    # --- watches ----------------------------------------------------------

    def _skipped(self, path: bytes) -> bool:
        return not in_scope(path, self._watch, self._skip)

    def _exclude_filter(self, path: str) -> bool:
        """pyinotify's exclude_filter: True keeps ``path`` unwatched."""
        return self._skipped(os.fsencode(path))

    def _add_watch(self, path: str) -> bool:
        """One watch on one directory; failures are counted, never raised."""
        try:
            ret = self._wm.add_watch(
                path, WATCH_MASK, rec=False, auto_add=False, exclude_filter=self._exclude_filter
            )
            wd = int(next(iter(ret.values()), -1))
        except Exception as exc:  # noqa: BLE001 - pyinotify's error paths raise odd things; count them
            self._counters["watch_errors"] += 1
            self._rl.log(
                log, logging.WARNING, "watch:exc", "event=inotify_watch_failed path=%r error=%r", path, exc
            )
            return False
        if wd >= 0:
            return True
        if wd == -2:  # excluded
            return False
        err = self._adder.last_errno if self._adder is not None else 0
        if err in _VANISHED:
            return False  # gone again before the watch: nothing to watch
        self._counters["watch_errors"] += 1
        if err == errno.ENOSPC:
            if not self._limit_logged:
                self._limit_logged = True
                log.error(
                    "event=inotify_watch_limit path=%r watches=%d hint=%r",
                    path,
                    len(self._wm.watches),
                    "raise it: sysctl fs.inotify.max_user_watches=N (and fs.inotify.max_user_instances); "
                    "directories beyond the limit are not watched",
                )
        else:
            self._rl.log(
                log,
                logging.WARNING,
                f"watch:{err}",
                "event=inotify_watch_failed path=%r error=%s",
                path,
                os.strerror(err) if err else "unknown",
            )
        return False

    def _watch_tree(self, top: str) -> str:
        """Watch ``top`` and every directory below it, pruning the excludes.

        Returns "" on success, else why ``top`` itself could not be watched.
        """
        if not os.path.isdir(top):
            return "not a directory" if os.path.exists(top) else "no such directory"
        if not self._add_watch(top):
            err = self._adder.last_errno if self._adder is not None else 0
            return os.strerror(err) if err else "watch refused"
        for root, dirs, _files in os.walk(top, onerror=None):
            keep = []
            for d in dirs:
                sub = os.path.join(root, d)
                if self._exclude_filter(sub) or os.path.islink(sub):
                    continue
                if self._add_watch(sub):
                    keep.append(d)
                elif self._limit_logged:
                    break
            dirs[:] = keep
        return ""

    def _adopt(self, top: str, out: list[RawEvent]) -> None:
        """A new directory: watch it, then report what is already in it."""
        stack = [top]
        while stack:
            cur = stack.pop()
            self._add_watch(cur)  # even without a watch, report what is there
            try:
                with os.scandir(cur) as it:
                    entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError:
                continue  # gone already, or unreadable: its own events say so
            for path_s, is_dir in entries:
                path = os.fsencode(path_s)
                if self._skipped(path):
                    continue
                self._rescanned[path] = self._cycle
                self._counters["rescanned"] += 1
                self._emit(out, RawEvent(kind=CREATION, ts_ms=self._clock.now_ms(), path=path, is_dir=is_dir))
                if is_dir:
                    stack.append(path_s)

    def _rewatch(self) -> None:
        """After an overflow: watch the directories whose creation was lost."""
        watched = {w.path for w in self._wm.watches.values()}
        for top in self._marked:
            for root, dirs, _files in os.walk(top):
                keep = []
                for d in dirs:
                    sub = os.path.join(root, d)
                    if self._exclude_filter(sub) or os.path.islink(sub):
                        continue
                    if sub in watched or self._add_watch(sub):
                        keep.append(d)
                dirs[:] = keep

    def _drop_tree(self, wd: int, old: str) -> None:
        """A watched directory moved out of sight: remove its watches."""
        prefix = old.rstrip("/") + "/"
        wds = [wd] + [w.wd for w in self._wm.watches.values() if w.path.startswith(prefix)]
        self._wm.rm_watch(wds, quiet=True)
        self._rl.log(
            log,
            logging.INFO,
            "moved_out",
            "event=inotify_dir_moved_away path=%r watches_removed=%d",
            old,
            len(wds),
        )


def _norm(path: bytes) -> bytes:
    return path if path == b"/" else os.path.normpath(path)


__all__ = ["InotifySource", "parse_events", "WATCH_MASK"]
