"""The fanotify event source: filesystem marks, dir handles resolved to byte paths.

One fanotify group reports directory-entry events (create, rename) with the
parent directory's file handle and the entry name, plus each exec with the
executable's. Filesystem marks (not per-directory watches) cover every mount
namespace and container; path scope is a prefix filter here. The kernel ABI
and the buffer parser live in :mod:`agent.sensor.sources.fanotify.abi`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from agent.sensor import longpath
from agent.sensor.containers import Containers
from agent.sensor.sources.base import PrefilterFn, Refused, under
from agent.sensor.sources.fanotify import abi
from agent.sensor.sources.fanotify.container_scope import ContainerScope
from agent.sensor.sources.fanotify.flood import FloodGuard, Muted
from agent.sensor.sources.fanotify.mounts import NETWORK_FS, PSEUDO_FS, Mount, mount_options, parse_mountinfo
from agent.sensor.sources.fanotify.reader import TAKE_BYTES, ReadAhead
from agent.shared.clock import Clock, SystemClock
from agent.shared.errors import SourceError
from agent.shared.events import CREATION, EXEC, OVERFLOW, RENAME, RawEvent
from agent.shared.ratelimit import RateLimiter

log = logging.getLogger("rarewrite.sources.fanotify")
MOUNT_RESCAN_S = 5.0
DIR_CACHE_SIZE = 4096
DIR_CACHE_TTL_S = 30.0
LOG_INTERVAL_S = 10.0
# Where names in a cached directory stand against watch/exclude.
_IN, _OUT, _MIXED = 1, 0, 2
# Events that only name a directory entry: the only ones a prefilter may drop.
_NOT_DIRENT = ~(abi.FAN_CREATE | abi.FAN_RENAME | abi.FAN_MOVED_TO | abi.FAN_ONDIR)
BEHIND_BYTES = 4 << 20  # this much read ahead (~45,000 events) and a folder over the rate: a flood
_DIR_RECORDS = (
    abi.FAN_EVENT_INFO_TYPE_DFID_NAME,
    abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    abi.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
)


@dataclass
class _Marked:
    mount_point: bytes
    fstype: str
    mask: int
    fsid: Optional[tuple[int, int]]


class FanotifySource:
    """fanotify with FAN_REPORT_DFID_NAME (+ TARGET_FID): creations, renames, execs.

    ``own_pid``: the agent's pid; its file events are dropped (``None``: none
    dropped). ``ignore``: directories that get an ignore mark (the agent's
    state directory). Paths are bytes throughout.
    """

    name = "fanotify"

    def __init__(
        self,
        watch: Sequence[bytes],
        exclude: Sequence[bytes],
        ignore: Sequence[bytes] = (),
        own_pid: Optional[int] = None,
        clock: Optional[Clock] = None,
        mounts_path: str = "/proc/self/mountinfo",
        flood: Optional[FloodGuard] = None,
        containers: Optional[Containers] = None,
    ) -> None:
        self._watch = [os.fsencode(w) for w in watch]
        self._exclude = [os.fsencode(x) for x in exclude]
        self._cscope = None if containers is None else ContainerScope(containers, self._watch, self._exclude)
        self._ct_marked: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}  # (ns, mount) -> fsid, mask
        self._ct_fsids: set[tuple[int, int]] = set()  # in scope, on filesystems only a container has
        self._mounts: list[Mount] = []
        self._ignore = [os.fsencode(i) for i in ignore]
        self._own_pid = own_pid
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._mounts_path = mounts_path
        self._fd = -1
        self._closed = False
        self._target_fid = False
        self._rename_bit: Optional[int] = None  # FAN_RENAME or FAN_MOVED_TO, decided at first mark
        self._marked: dict[int, _Marked] = {}  # st_dev -> mark
        self._refused: dict[bytes, str] = {}  # mount point -> reason
        self._by_fsid: dict[tuple[int, int], bytes] = {}
        self._mounts_hash = b""
        self._last_scan = 0.0
        self._dir_cache: OrderedDict[bytes, tuple[bytes, float, int]] = OrderedDict()  # -> path, at, scope
        self._counters = {
            "seen": 0,
            "overflows": 0,
            "unresolved": 0,
            "exec": 0,
            "own_pid_dropped": 0,
            "out_of_scope": 0,
            "prefiltered": 0,
            "parse_errors": 0,
            "read_errors": 0,
            "flood_muted": 0,
            "flood_dropped": 0,
        }
        self._rl = RateLimiter(self._clock, interval_s=LOG_INTERVAL_S)
        self._watch_pre = tuple(w.rstrip(b"/") + b"/" for w in self._watch)
        self._watch_eq = frozenset(self._watch)  # scope: two C-level checks, startswith(tuple) and in
        self._excl_pre = tuple(x.rstrip(b"/") + b"/" for x in self._exclude)
        self._excl_eq = frozenset(self._exclude)
        # pid -> (until, cannot_match) from the daemon: until that monotonic time, none of the
        # pid's events can match (or some may). Ruled-out events are counted in `prefiltered`,
        # never resolved: a busy host's non-web-server writes cost almost nothing.
        self._prefilter: Optional[PrefilterFn] = None
        self._skip: dict[int, tuple[float, bool]] = {}
        self._prefiltered_new = 0
        self._execd: set[int] = set()  # pids with an exec in the current read() call
        self._ahead: Optional[ReadAhead] = None
        self._seen_read_errors = 0
        self._flood = flood if flood is not None else FloodGuard()
        self._overflowed = False  # a queue overflow since the last flood check

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Create the group and mark filesystems; SourceError when fanotify is unusable."""
        if self._fd >= 0:
            return
        if self._closed:
            raise SourceError("fanotify source already closed")
        self._fd = self._init_group()
        try:
            self._rescan_mounts(force=True)
            if self._watch and not any(m.mask & abi.FAN_CREATE for m in self._marked.values()):
                reasons = "; ".join(f"{os.fsdecode(k)}: {v}" for k, v in self._refused.items()) or "no mount"
                raise SourceError(f"fanotify: no watched filesystem could be marked ({reasons})")
            self._place_ignore_marks()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._ahead = ReadAhead(self._fd, self._clock)
        self._ahead.start()
        log.info(
            "fanotify started target_fid=%s rename=%s marked=%d refused=%d",
            self._target_fid,
            "FAN_RENAME" if self._rename_bit == abi.FAN_RENAME else "FAN_MOVED_TO",
            len(self._marked),
            len(self._refused),
        )

    def _init_group(self) -> int:
        # A bounded kernel queue (fs.fanotify.max_queued_events, 16384 by
        # default): an unlimited one grows in kernel memory charged to the
        # agent's cgroup, and a flood drove it to MemoryMax and the OOM
        # killer to the agent (bench/flood.py). Bounded, the kernel drops events instead
        # (one overflow record) and the agent's memory stays bounded
        # (the read-ahead's bound: reader.py).
        # No FAN_REPORT_PIDFD: the pid and start time already guard against
        # reuse, and a pidfd made and closed per event costs two syscalls.
        # (Its records, if a kernel sent them, are skipped by length.)
        base = abi.FAN_CLASS_NOTIF | abi.FAN_CLOEXEC | abi.FAN_NONBLOCK
        event_flags = os.O_RDONLY | abi.O_LARGEFILE | os.O_CLOEXEC
        attempts = ((abi.FAN_REPORT_DFID_NAME_TARGET, True), (abi.FAN_REPORT_DFID_NAME, False))
        last: Optional[OSError] = None
        for flags, target in attempts:
            try:
                fd = abi.fanotify_init(base | flags, event_flags)
            except OSError as exc:
                last = exc
                if exc.errno == errno.EINVAL:
                    continue
                break
            self._target_fid = target
            if not target:
                log.warning(
                    "fanotify no FAN_REPORT_TARGET_FID (kernel < 5.17): repeated same-name creates may merge"
                )
            return fd
        assert last is not None  # noqa: S101 - the loop ran at least once
        if last.errno == errno.EPERM:
            raise SourceError("fanotify_init: EPERM: need CAP_SYS_ADMIN") from last
        if last.errno == errno.EINVAL:
            raise SourceError(
                "fanotify_init: EINVAL: kernel too old (needs 5.9 for FAN_REPORT_DFID_NAME)"
            ) from last
        if last.errno == errno.ENOSYS:
            raise SourceError("fanotify_init: ENOSYS: kernel built without fanotify") from last
        raise SourceError(
            f"fanotify_init: {errno.errorcode.get(last.errno or 0, last.errno)}: {last}"
        ) from last

    def close(self) -> None:
        """Close the group (the kernel drops every mark with it). Idempotent."""
        self._closed = True
        if self._ahead is not None:
            self._ahead.stop()  # before the fd goes: its number could be reused
            self._ahead = None
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self._dir_cache.clear()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out["marked"] = sorted(
            os.fsdecode(m.mount_point) for m in self._marked.values() if m.mask & abi.FAN_CREATE
        )
        out["exec_marked"] = sorted(os.fsdecode(m.mount_point) for m in self._marked.values())
        out["read_ahead_paused"] = self._ahead.paused if self._ahead is not None else 0
        out["refused"] = [Refused(path=os.fsdecode(k), reason=v) for k, v in sorted(self._refused.items())]
        out["target_fid"] = self._target_fid
        out["merge_possible"] = not self._target_fid
        out["rename_event"] = "FAN_RENAME" if self._rename_bit == abi.FAN_RENAME else "FAN_MOVED_TO"
        out["dir_cache"] = len(self._dir_cache)
        out["read_ahead_bytes"] = self._ahead.pending_bytes() if self._ahead is not None else 0
        return out

    def set_prefilter(self, prefilter: Optional[PrefilterFn]) -> None:
        """Install the daemon's prefilter; forgets every cached answer (a new rule)."""
        self._prefilter = prefilter
        self._skip.clear()

    def stop_reading(self) -> None:
        """Stop reading the kernel queue but keep what was read ahead: the
        daemon drains it with read(0) before close() at a clean stop."""
        if self._ahead is not None:
            self._ahead.stop()

    def take_prefiltered(self) -> int:
        """Events dropped by the prefilter since the last call."""
        n, self._prefiltered_new = self._prefiltered_new, 0
        return n

    # --- marks -------------------------------------------------------------

    def _rescan_mounts(self, force: bool = False) -> None:
        """Mark filesystems that appeared since the last scan (mounts come and go, containers start)."""
        self._last_scan = self._clock.monotonic()
        try:
            with open(self._mounts_path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self._rl.log(
                log,
                logging.WARNING,
                "mountinfo",
                "mountinfo unreadable path=%s error=%s",
                self._mounts_path,
                exc,
            )
            return
        digest = hashlib.blake2b(data, digest_size=16).digest()
        changed = digest != self._mounts_hash
        if changed:
            self._mounts = parse_mountinfo(data)
        if self._cscope is not None:
            self._cscope.containers.set_host_mounts(self._mounts)
            self._cscope.containers.scan()
            if self._cscope.refresh():
                self._containers_changed()
                changed = True
        if not changed and not force:
            return
        self._mounts_hash = digest
        wanted = self._plan(self._mounts)
        for dev in [d for d in self._marked if d not in wanted]:
            gone = self._marked.pop(dev)  # the kernel dropped the mark with the superblock
            if gone.fsid is not None:
                self._by_fsid.pop(gone.fsid, None)
            log.info("fanotify filesystem gone mount=%r", gone.mount_point)
        live_points = {m[0].mount_point for m in wanted.values()}
        for point in [p for p in self._refused if p not in live_points and not p.startswith(b"container:")]:
            del self._refused[point]
        self._mark_wanted(wanted)

    def _mark_wanted(self, wanted: dict[int, tuple[Mount, int, list[Mount]]]) -> None:
        """Mark each planned filesystem not yet marked with (at least) its mask."""
        for dev, (mount, mask, candidates) in wanted.items():
            have = self._marked.get(dev)
            if have is None or have.mask & mask != mask:
                self._mark_fs(dev, mount, mask, candidates)

    def _plan(self, mounts: list[Mount]) -> dict[int, tuple[Mount, int, list[Mount]]]:
        """Filesystem (st_dev) -> (mount to mark through, wanted mask, all its mounts)."""
        # A container's merged overlay (docker's .../merged): its writes land in its upper
        # directory's filesystem, marked as any other, and its superblock refuses marks: it is
        # left out, not a gap. An overlay that holds a watched path itself stays (refused: a gap).
        local = [m for m in mounts if m.fstype not in PSEUDO_FS]
        merged = {m.mount_id for m in local if _upper_visible(m)}  # one stat each, not one per watch
        in_scope_devs: set[int] = set()
        extra = [p.rstrip(b"/") for p in self._cscope.prefixes] if self._cscope is not None else []
        for w in self._watch + extra:
            best: Optional[Mount] = None
            for m in local:
                if under(w, m.mount_point) and (best is None or len(m.mount_point) >= len(best.mount_point)):
                    best = m
            if best is not None and not any(under(best.mount_point, x) for x in self._exclude):
                in_scope_devs.add(best.dev)
            for m in local:
                inside = under(m.mount_point, w) and not any(under(m.mount_point, x) for x in self._exclude)
                if inside and m.mount_id not in merged:
                    in_scope_devs.add(m.dev)
        by_dev: dict[int, list[Mount]] = {}
        for m in local:
            if m.dev in in_scope_devs or m.mount_id not in merged:
                by_dev.setdefault(m.dev, []).append(m)
        plan: dict[int, tuple[Mount, int, list[Mount]]] = {}
        for dev, group in by_dev.items():
            mask = 0
            if dev in in_scope_devs:
                mask |= abi.FAN_CREATE | abi.FAN_ONDIR
            if group[0].fstype not in NETWORK_FS:
                mask |= abi.FAN_OPEN_EXEC
            if mask:
                group.sort(key=lambda m: (m.root != b"/", len(m.mount_point)))
                plan[dev] = (group[0], mask, group)
        return plan

    def _mark_fs(self, dev: int, mount: Mount, mask: int, candidates: list[Mount]) -> None:
        point: Optional[bytes] = None
        for m in candidates:  # a mount point may be hidden under another mount
            try:
                if os.stat(m.mount_point).st_dev == dev:
                    point = m.mount_point
                    break
            except OSError:
                continue
        if point is None:  # hidden under another mount: nothing reaches it by path
            log.info("fanotify mount hidden mount=%r fstype=%s", mount.mount_point, mount.fstype)
            return
        full = mask
        if mask & abi.FAN_CREATE:
            full |= self._rename_bit if self._rename_bit is not None else abi.FAN_RENAME
        flags = abi.FAN_MARK_ADD | abi.FAN_MARK_FILESYSTEM
        try:
            try:
                abi.fanotify_mark(self._fd, flags, full, abi.AT_FDCWD, point)
                if mask & abi.FAN_CREATE and self._rename_bit is None:
                    self._rename_bit = abi.FAN_RENAME
            except OSError as exc:
                if exc.errno != errno.EINVAL or not mask & abi.FAN_CREATE or self._rename_bit is not None:
                    raise
                full = (full & ~abi.FAN_RENAME) | abi.FAN_MOVED_TO  # kernel < 5.17
                abi.fanotify_mark(self._fd, flags, full, abi.AT_FDCWD, point)
                self._rename_bit = abi.FAN_MOVED_TO
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            hint = " need CAP_SYS_ADMIN" if exc.errno == errno.EPERM else ""
            self._refuse(point, f"{name}{hint}")
            return
        fsid: Optional[tuple[int, int]] = None
        try:
            fsid = abi.fsid_of_statvfs(os.statvfs(point).f_fsid)
        except OSError:
            pass
        self._marked[dev] = _Marked(point, mount.fstype, mask, fsid)
        self._refused.pop(point, None)
        if fsid is not None:
            self._by_fsid[fsid] = point
        log.info(
            "fanotify marked mount=%r fstype=%s files=%s", point, mount.fstype, bool(mask & abi.FAN_CREATE)
        )

    def _new_container(self, pid: int) -> None:
        """A process starting in a mount namespace not seen yet (a container
        starting): its scope and mounts now, before its first write is read."""
        cs = self._cscope
        if cs is None:
            return
        if not cs.containers.refresh(cs.containers.ns_of(pid), pid):
            return
        if cs.refresh():
            self._containers_changed()
            self._mark_wanted(self._plan(self._mounts))

    def _containers_changed(self) -> None:
        self._dir_cache.clear()  # cached directory scopes may have changed with the routes
        self._mark_containers()

    def _mark_containers(self) -> None:
        """Mark the filesystems only a container has, through its /proc/PID/root;
        one that refuses is a gap like any unmarked filesystem."""
        if self._cscope is None:
            return
        live = {o.key for o in self._cscope.own}
        for key in [k for k in self._ct_marked if k not in live]:
            fsid, _ = self._ct_marked.pop(key)  # the container is gone, and its mount with it
            self._ct_fsids.discard(fsid)
            self._by_fsid.pop(fsid, None)
        for label in [p for p in self._refused if p.startswith(b"container:")]:
            del self._refused[label]
        for own in self._cscope.own:
            mask = abi.FAN_OPEN_EXEC | (abi.FAN_CREATE | abi.FAN_ONDIR | (self._rename_bit or abi.FAN_RENAME)
                                        if own.in_scope else 0)  # fmt: skip
            try:  # through an fd walked to without following a symlink: one resolves on the host
                fd = longpath.open_dir_below(own.root, own.mount_point)
                try:
                    fsid = abi.fsid_of_statvfs(os.fstatvfs(fd).f_fsid)
                    have = self._ct_marked.get(own.key)
                    if have is None or have[1] & mask != mask:
                        abi.fanotify_mark(self._fd, abi.FAN_MARK_ADD | abi.FAN_MARK_FILESYSTEM, mask,
                                          abi.AT_FDCWD, b"/proc/self/fd/%d" % fd)  # fmt: skip
                        log.info("fanotify marked container mount=%s files=%s", own.label, own.in_scope)
                finally:
                    os.close(fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ESRCH):  # gone: its namespace is read again
                    reason = errno.errorcode.get(exc.errno or 0, "error")
                    self._refuse(b"container:" + own.label.encode(), reason)
                continue
            self._ct_marked[own.key] = (fsid, mask)
            self._by_fsid[fsid] = own.point  # where its handles are opened (a live pid of it)
            if own.in_scope:
                self._ct_fsids.add(fsid)

    def _refuse(self, point: bytes, reason: str) -> None:
        if self._refused.get(point) != reason:
            log.warning("fanotify mark refused mount=%r reason=%s", point, reason)
        self._refused[point] = reason

    def _place_ignore_marks(self) -> None:
        """Ignore marks on the agent's own directories; the pid filter is the real guarantee."""
        for path in self._ignore:
            self._ignore_mark(path)

    def _ignore_mark(self, path: bytes) -> Optional[tuple[int, int]]:
        """An ignore mark for creations and renames in ``path``: the (flags,
        mask) it was placed with (6.0's FAN_MARK_IGNORE, else the older
        ignored mask), or None (logged) when the kernel refused both."""
        rename = self._rename_bit if self._rename_bit is not None else abi.FAN_MOVED_TO
        attempts = (
            (
                abi.FAN_MARK_ADD | abi.FAN_MARK_IGNORE_SURV,
                abi.FAN_CREATE | rename | abi.FAN_ONDIR | abi.FAN_EVENT_ON_CHILD,
            ),
            (
                abi.FAN_MARK_ADD | abi.FAN_MARK_IGNORED_MASK | abi.FAN_MARK_IGNORED_SURV_MODIFY,
                abi.FAN_CREATE | rename,
            ),
        )
        err: Optional[OSError] = None
        for flags, mask in attempts:
            try:
                abi.fanotify_mark(self._fd, flags, mask, abi.AT_FDCWD, path)
                return flags, mask
            except OSError as exc:
                err = exc
        log.warning("fanotify ignore mark failed path=%r error=%s", path, err.strerror if err else "")
        return None

    # --- reading -----------------------------------------------------------

    def read(self, timeout: float) -> Sequence[RawEvent]:
        """Wait up to ``timeout`` s for read-ahead events; return them in kernel order."""
        ahead = self._ahead
        if self._fd < 0 or ahead is None:
            return []
        if self._clock.monotonic() - self._last_scan >= MOUNT_RESCAN_S:
            self._rescan_mounts()
        if ahead.read_errors != self._seen_read_errors:
            self._counters["read_errors"] += ahead.read_errors - self._seen_read_errors
            self._seen_read_errors = ahead.read_errors
            self._rl.log(log, logging.ERROR, "read", "fanotify read failed error=%s", ahead.last_error)
        chunks = ahead.take(timeout, TAKE_BYTES)
        if not chunks:
            return []
        out: list[RawEvent] = []
        mount_fds: dict[tuple[int, int], int] = {}
        self._execd.clear()
        try:
            for ts, buf in chunks:
                res = abi.parse_buffer(buf)
                if res.error is not None:
                    self._counters["parse_errors"] += 1
                    self._rl.log(log, logging.ERROR, "parse", "fanotify parse stopped reason=%s", res.error)
                self._convert_all(res.events, ts, out, mount_fds)
        finally:
            for fd in mount_fds.values():
                if fd >= 0:
                    _close_quietly(fd)
        self._flood_tick(out)
        return out

    # --- flood muting (flood.py) -------------------------------------------

    def _muted(self, ev: abi.ParsedEvent, read_ms: int) -> bool:
        """Count a dirent event for its directory; True when that directory
        is muted (the event was queued before the mute: dropped unread)."""
        for rec in ev[3]:
            if rec[0] in _DIR_RECORDS:
                m = self._flood.muted.get(rec[1])
                if m is None:
                    self._flood.count(rec[1], read_ms)
                    return False
                m.dropped += 1
                self._counters["flood_dropped"] += 1
                return True
        return False

    def _flood_tick(self, out: list[RawEvent]) -> None:
        """Mute the directories that flood, lift the mutes that ran out; each
        is an overflow record with the directory's path (a "flood" gap)."""
        now = self._clock.monotonic()
        ahead = self._ahead
        behind = self._overflowed or (
            ahead is not None and ahead.pending_bytes() >= min(ahead.limit() // 2, BEHIND_BYTES)
        )
        hot, done = self._flood.due(now, behind)
        self._overflowed = False
        now_ms = self._clock.now_ms()
        for key in hot:
            hit = self._dir_cache.get(key)
            placed = self._ignore_mark(hit[0]) if hit is not None else None
            if hit is None or placed is None:
                continue
            self._flood.muted[key] = Muted(hit[0], now + self._flood.mute_s, now_ms, *placed)
            self._counters["flood_muted"] += 1
            log.warning("event=flood_muted dir=%r for_s=%d", hit[0], self._flood.mute_s)
            out.append(RawEvent(kind=OVERFLOW, ts_ms=now_ms, path=hit[0], lost=0))
        for _, m in done:
            with contextlib.suppress(OSError):  # the directory may be gone: its mark went with it
                abi.fanotify_mark(self._fd, abi.FAN_MARK_REMOVE | (m.flags & ~abi.FAN_MARK_ADD), m.mask,
                                  abi.AT_FDCWD, m.path)  # fmt: skip
            log.warning("event=flood_unmuted dir=%r dropped_queued=%d", m.path, m.dropped)
            out.append(RawEvent(kind=OVERFLOW, ts_ms=m.since_ms, path=m.path, lost=m.dropped))

    def _convert_all(  # noqa: PLR0912 - the prefilter's fast path inline: it runs per kernel event
        self,
        events: list[abi.ParsedEvent],
        ts: int,
        out: list[RawEvent],
        mount_fds: dict[tuple[int, int], int],
    ) -> None:
        # The prefilter's fast path first: a dirent event of a pid known not to match, in a cached
        # directory wholly in (or out of) scope, costs a few dict lookups and no path or object.
        now = self._clock.monotonic()
        skip, cache, execd = self._skip, self._dir_cache, self._execd
        for ev in events:
            mask, fd, pid = ev[0], ev[1], ev[2]
            if (
                not mask & _NOT_DIRENT
                and fd < 0
                and pid > 0
                and pid != self._own_pid
                and pid not in execd
                and self._prefilter is not None
            ):
                known = skip.get(pid)
                if known is None or known[0] <= now:
                    known = self._prefilter(pid)
                    if len(skip) >= 4096:
                        skip.clear()
                    skip[pid] = known
                if known[1] and known[0] > now:
                    want = (
                        abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME
                        if mask & abi.FAN_RENAME
                        else abi.FAN_EVENT_INFO_TYPE_DFID_NAME
                    )
                    hit = None
                    for rec in ev[3]:
                        if rec[0] == want:
                            hit = cache.get(rec[1])
                            break
                    if hit is not None and hit[2] != _MIXED and now - hit[1] < DIR_CACHE_TTL_S:
                        if mask & abi.FAN_ONDIR and mask & (abi.FAN_RENAME | abi.FAN_MOVED_TO):
                            cache.clear()  # a moved directory: every path below it is stale
                        if hit[2] == _IN:
                            self._counters["seen"] += 1
                            self._counters["prefiltered"] += 1
                            self._prefiltered_new += 1
                        else:
                            self._counters["out_of_scope"] += 1
                        continue
            if not mask & _NOT_DIRENT and self._muted(ev, ts):
                continue
            try:
                self._convert(ev, ts, out, mount_fds)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the reader
                self._counters["unresolved"] += 1
                self._rl.log(
                    log, logging.ERROR, "convert", "fanotify event dropped mask=%#x error=%r", mask, exc
                )
            finally:
                if fd >= 0:
                    _close_quietly(fd)

    def _overflow(self, ts: int, out: list[RawEvent]) -> None:
        self._counters["overflows"] += 1
        self._overflowed = True
        # the kernel does not say how many it dropped: lost 0 is "unknown"
        self._rl.log(log, logging.WARNING, "overflow", "fanotify queue overflow: events lost")
        out.append(RawEvent(kind=OVERFLOW, ts_ms=ts, path=None, lost=0))

    def _convert(
        self,
        ev: abi.ParsedEvent,
        ts: int,
        out: list[RawEvent],
        mount_fds: dict[tuple[int, int], int],
    ) -> None:
        mask = ev.mask
        if mask & abi.FAN_Q_OVERFLOW:
            self._overflow(ts, out)
            return
        pid = max(ev.pid, 0)  # 0: a writer outside the agent's pid namespace (the resolver says so)
        if mask & abi.FAN_OPEN_EXEC:
            rec = ev.record(abi.FAN_EVENT_INFO_TYPE_DFID_NAME)
            path = self._join(rec, mount_fds) if rec is not None else None
            if path is not None:
                self._counters["exec"] += 1
                if pid:
                    self._new_container(pid)
                    self._execd.add(pid)  # the resolver learns it only after this call
                    self._skip.pop(pid, None)
                out.append(RawEvent(kind=EXEC, ts_ms=ts, path=path, pid=pid))
        is_dir = bool(mask & abi.FAN_ONDIR)
        if mask & abi.FAN_RENAME:
            old = ev.record(abi.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME)
            new = ev.record(abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
            if is_dir:
                self._dir_cache.clear()  # every cached path below the moved dir is stale
            if new is not None:
                new_path = self._join(new, mount_fds)
                old_path = self._join(old, mount_fds) if old is not None else None
                self._emit(out, kind=RENAME, ts=ts, path=new_path, pid=pid, original=old_path, is_dir=is_dir,
                           own=new.fsid in self._ct_fsids)  # fmt: skip
        if mask & abi.FAN_MOVED_TO:
            if is_dir:
                self._dir_cache.clear()
            rec = ev.record(abi.FAN_EVENT_INFO_TYPE_DFID_NAME)
            if rec is not None:
                self._emit(out, kind=RENAME, ts=ts, path=self._join(rec, mount_fds), pid=pid, original=None,
                           is_dir=is_dir, own=rec.fsid in self._ct_fsids)  # fmt: skip
        if mask & abi.FAN_CREATE:
            rec = ev.record(abi.FAN_EVENT_INFO_TYPE_DFID_NAME)
            if rec is not None:
                self._emit(out, kind=CREATION, ts=ts, path=self._join(rec, mount_fds), pid=pid, original=None,
                           is_dir=is_dir, own=rec.fsid in self._ct_fsids)  # fmt: skip

    def _emit(
        self,
        out: list[RawEvent],
        *,
        kind: str,
        ts: int,
        path: Optional[bytes],
        pid: Optional[int],
        original: Optional[bytes],
        is_dir: bool,
        own: bool = False,
    ) -> None:
        """``own``: on a filesystem only a container has, marked because its files are in scope."""
        if path is None:
            return  # counted as unresolved by _join
        if pid is not None and pid == self._own_pid:
            self._counters["own_pid_dropped"] += 1
            return
        if not own and not self._in_scope(path):
            self._counters["out_of_scope"] += 1
            return
        self._counters["seen"] += 1
        out.append(RawEvent(kind, ts, path, pid, original, is_dir, own_fs=own))

    def _in_scope(self, path: bytes) -> bool:
        """In the host's scope, or in a container's: a container's scope only adds
        (what any process could build as a "container" must not hide host paths)."""
        if (path.startswith(self._watch_pre) or path in self._watch_eq) and not (
            path.startswith(self._excl_pre) or path in self._excl_eq
        ):
            return True
        return self._cscope is not None and bool(self._cscope.prefixes) and bool(self._cscope.in_scope(path))

    def _dir_scope(self, directory: bytes) -> int:
        """_IN when every name in ``directory`` is in scope, _OUT when none
        is, _MIXED when it depends on the name (a watch or exclude below it)."""
        host = self._host_dir_scope(directory)
        cs = self._cscope
        if host == _IN or cs is None or not cs.prefixes:
            return host
        below = directory.rstrip(b"/") + b"/"
        if any(p != below and p.startswith(below) for p in cs.prefixes + cs.excluded):
            return _MIXED
        if below.startswith(cs.prefixes) and not below.startswith(cs.excluded):
            return _IN
        return host

    def _host_dir_scope(self, directory: bytes) -> int:
        below = directory.rstrip(b"/") + b"/"
        if below.startswith(self._excl_pre) or directory in self._excl_eq:
            return _OUT
        if any(p != below and p.startswith(below) for p in self._excl_pre + self._watch_pre):
            return _MIXED
        return _IN if below.startswith(self._watch_pre) else _OUT

    # --- handle resolution -------------------------------------------------

    def _join(self, rec: abi.FidRecord, mount_fds: dict[tuple[int, int], int]) -> Optional[bytes]:
        directory = self._dir_path(rec, mount_fds)
        if directory is None:
            return None
        name = rec.name or b""
        if not name or name == b".":
            return directory
        return (directory if directory.endswith(b"/") else directory + b"/") + name

    def _dir_path(self, rec: abi.FidRecord, mount_fds: dict[tuple[int, int], int]) -> Optional[bytes]:
        key = rec.key
        now = self._clock.monotonic()
        hit = self._dir_cache.get(key)
        if hit is not None:
            if now - hit[1] < DIR_CACHE_TTL_S:
                self._dir_cache.move_to_end(key)
                return hit[0]
            del self._dir_cache[key]
        mfd = self._mount_fd(rec.fsid, mount_fds)
        if mfd < 0:
            self._unresolved(rec, "unknown_fsid")
            return None
        try:
            fd = abi.open_by_handle_at(mfd, rec.handle_type, rec.handle, abi.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            self._unresolved(rec, errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return None
        try:
            path = longpath.name_of_fd(fd)  # deeper than PATH_MAX too
        except OSError as exc:
            self._unresolved(rec, errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return None
        finally:
            _close_quietly(fd)
        if path.endswith(b" (deleted)"):
            return path  # a directory removed since: keep the event, never cache it
        scope = _IN if rec.fsid in self._ct_fsids else self._dir_scope(path)
        self._dir_cache[key] = (path, now, scope)
        if len(self._dir_cache) > DIR_CACHE_SIZE:
            self._dir_cache.popitem(last=False)
        return path

    def _mount_fd(self, fsid: tuple[int, int], mount_fds: dict[tuple[int, int], int]) -> int:
        """A directory fd on the filesystem, open only for this read() call.

        Held no longer, so that the agent never keeps a mount busy (umount
        would fail with EBUSY while we held an fd on it).
        """
        fd = mount_fds.get(fsid)
        if fd is not None:
            return fd
        point = self._by_fsid.get(fsid)
        fd = -1
        if point is not None:
            try:
                fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if abi.fsid_of_statvfs(os.fstatvfs(fd).f_fsid) != fsid:
                    _close_quietly(fd)
                    fd = -1
            except OSError:
                fd = -1
        mount_fds[fsid] = fd
        return fd

    def _unresolved(self, rec: abi.FidRecord, reason: str) -> None:
        self._counters["unresolved"] += 1
        self._rl.log(
            log,
            logging.WARNING,
            "unresolved:" + reason,
            "fanotify handle unresolved reason=%s fsid=%s handle=%s name=%r",
            reason,
            f"{rec.fsid[0]:08x}{rec.fsid[1]:08x}",
            rec.handle.hex(),
            rec.name,
        )


def _upper_visible(m: Mount) -> bool:
    """An overlay whose upper directory the agent can reach (its writes are seen there)."""
    if m.fstype != "overlay":
        return False
    upper = mount_options(m.super_options).get(b"upperdir")
    return upper is not None and os.path.isdir(upper)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
