"""pid -> process and user: turns a source's RawEvent into a FileEvent.

/proc is read directly (stat, status, exe, cmdline): cheaper than psutil per
event, and a cache hit costs one read of /proc/P/stat to prove the pid still
names the same process (same start time, same comm). Exec events are read
at once and remembered, because a writer that exits at once (a one-liner
dropped by a web shell) is gone before its file event is read.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Optional

from agent.sensor import longpath
from agent.sensor.containers import Containers, View
from agent.shared.clock import Clock
from agent.shared.events import (
    CACHED,
    EXACT,
    EXEC,
    INFERRED,
    OVERFLOW,
    UNCERTAIN,
    UNKNOWN,
    FileEvent,
    ProcessInfo,
    RawEvent,
    UserInfo,
    event_type_for,
)

COMM_LEN = 15  # TASK_COMM_LEN - 1
REUSE_SLACK_S = 1.5  # btime has 1 s granularity: a start later than this after the event means pid reuse
PROCESS_LIST_TTL_S = 1.0
# A process checked against /proc this recently is taken as is: reusing its
# pid needs the whole pid space to wrap first, which takes far longer, and
# an exec in between arrives as an exec event (which updates the cache).
TRUST_S = 0.05
# An event whose process shows another image in /proc than we knew, with no
# exec record before it in the queue, was written before that exec (every
# local filesystem is exec-marked, and the queue is in order): it keeps the
# old identity while the record is on its way. An exec whose record never
# comes (a network filesystem, a memfd) is believed after this long.
EXEC_WAIT_S = 5.0
_DELETED = b" (deleted)"
PROC_PID_INIT_INO = 0xEFFFFFFC


@dataclass(frozen=True)
class _Proc:
    """What we know of one process; ``complete`` when read from its live /proc."""

    info: ProcessInfo
    comm: Optional[str]
    start_ticks: Optional[int]
    euid: Optional[int]
    complete: bool
    # the identity before a change the kernel did not report (prctl, setuid),
    # given with attribution "uncertain" to events read up to ``since_ms``
    before: Optional[_Proc] = None
    since_ms: int = 0
    ns: Optional[int] = None  # its mount namespace, when not the agent's (a container)


def _is_loader(path: bytes) -> bool:
    """The ELF interpreter, opened for exec after the real binary: not the process image."""
    base = path.rsplit(b"/", 1)[-1]
    return base.startswith((b"ld-linux", b"ld-musl", b"ld64.so", b"ld.so")) or (
        base.startswith(b"ld-") and b".so" in base
    )


class Resolver:
    """Attributes file events to processes and users.

    ``is_web_process`` is only used for sources without a pid (inotify): the
    newest running process with the file owner's euid and a web-server name
    is taken as the writer, attribution ``inferred``.
    """

    def __init__(
        self,
        clock: Clock,
        exec_cache_size: int = 4096,
        proc_root: str = "/proc",
        is_web_process: Optional[Callable[[str], bool]] = None,
        containers: Optional[Containers] = None,
    ) -> None:
        self._clock = clock
        self._size = max(1, exec_cache_size)
        self._root = proc_root.rstrip("/") or "/"
        self._is_web = is_web_process
        self._containers = containers
        self._ct_users: dict[tuple[bytes, int], UserInfo] = {}
        self._cache: OrderedDict[int, _Proc] = OrderedDict()
        self._checked: dict[int, float] = {}  # pid -> monotonic time of its last /proc check
        self._gone: set[int] = set()  # pids whose last check found no process (cached record kept)
        self._exec_pending: dict[int, float] = {}  # pid -> when /proc first showed an exec not yet read
        self._users: dict[int, UserInfo] = {}  # one shared object per uid
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._btime = self._boot_time()
        self._plist: list[tuple[float, int, str, int]] = []
        self._plist_at = -1e18
        self.counters = {
            "exact": 0,
            "cached": 0,
            "inferred": 0,
            "unknown": 0,
            "uncertain": 0,
            "exec": 0,
            "pid_reused": 0,
            "outside_pid_namespace": 0,
            "in_container": 0,
            "overlay_work": 0,
        }

    # --- public ------------------------------------------------------------

    def resolve(self, raw: RawEvent) -> Optional[FileEvent]:
        """A FileEvent for a creation or rename; None for exec and overflow records."""
        if raw.kind == EXEC:
            if raw.pid and raw.path is not None:
                self._on_exec(raw.pid, raw.path)
            return None
        if raw.kind == OVERFLOW:
            return None
        if raw.pid is None:
            proc, user, attribution = self._inferred(raw)
        elif raw.pid == 0:
            # fanotify's pid 0: a writer outside this agent's pid namespace, which
            # /proc here cannot show (the agent belongs in the host's namespace)
            self.counters["outside_pid_namespace"] += 1
            proc, user, attribution = ProcessInfo(), self._user(self._owner(raw.path)), UNKNOWN
        else:
            found, attribution = self._lookup(raw.pid, raw.ts_ms)
            proc = found.info if found is not None else ProcessInfo(pid=raw.pid)
            euid = found.euid if found is not None else None
            if euid is None:
                # a new file's owner is its creator's fsuid (a renamed one's, most often the
                # renamer's: an upload moved into place), unless chowned since: the process's
                # user as of the write is the better witness where known (gone before we read it)
                euid = self._owner(raw.path)
            view = self._view(found)
            if view is None and self._containers is not None and (found is None or found.ns is None):
                view = self._containers.view_for_path(raw.path)  # its writer gone before we knew where
            if view is not None:
                return self._in_container(raw, view, proc, euid, attribution)
            user = self._user(euid)
        if self._containers is not None and self._containers.is_work(raw.path):
            self.counters["overlay_work"] += 1  # overlayfs's own copy-up entry
            return None
        self.counters[attribution] += 1
        return FileEvent(
            ts_ms=raw.ts_ms,
            action=raw.kind,
            path=raw.path,
            process=proc,
            user=user,
            event_type=event_type_for(raw.kind),
            original_path=raw.original_path,
            os_type="linux",
            attribution=attribution,
        )

    def _in_container(
        self, raw: RawEvent, view: View, proc: ProcessInfo, euid: Optional[int], attribution: str
    ) -> Optional[FileEvent]:
        """A container's event with its paths and user as the container sees them."""
        if view.is_work(raw.path) or view.is_work(raw.original_path):
            self.counters["overlay_work"] += 1
            return None
        path = view.to_container(raw.path)
        host_path = raw.path if path is not None and path != raw.path else None
        if raw.own_fs and proc.pid is not None:  # no host path: the host reaches it through the process
            path = path or raw.path
            host_path = b"/proc/%d/root%s" % (proc.pid, path)
        self.counters[attribution] += 1
        self.counters["in_container"] += 1
        return FileEvent(
            ts_ms=raw.ts_ms,
            action=raw.kind,
            path=path if path is not None else raw.path,
            process=proc,
            user=self._container_user(view, euid),
            event_type=event_type_for(raw.kind),
            original_path=view.to_container(raw.original_path) or raw.original_path,
            os_type="linux",
            attribution=attribution,
            host_path=host_path,
        )

    def _view(self, rec: Optional[_Proc]) -> Optional[View]:
        if rec is None or rec.ns is None or self._containers is None or rec.info.pid is None:
            return None
        return self._containers.view(rec.ns, rec.info.pid)

    def _container_user(self, view: View, host_uid: Optional[int]) -> UserInfo:
        if host_uid is None:
            return UserInfo()
        key = (view.digest, host_uid)  # not the namespace's inode: the kernel reuses those
        user = self._ct_users.get(key)
        if user is None:
            uid, name = view.user(host_uid)
            if len(self._ct_users) >= 4096:
                self._ct_users.clear()
            user = self._ct_users[key] = UserInfo(id=str(uid) if uid is not None else None, name=name)
        return user

    def trusted(self, pid: int) -> Optional[tuple[Optional[str], Optional[int], float]]:
        """(name, euid, until) of a pid as :meth:`resolve` would see it now:
        live and checked against /proc within TRUST_S, or found gone within
        TRUST_S and known from before (its events are then attributed from
        the cache, as a burst read after its writer exited is). Re-checked
        here when older; None when the resolver would not know. ``until`` is
        the monotonic time at which that check stops counting: the
        prefilter's answer holds until then."""
        cached = self._cache.get(pid)
        now = self._clock.monotonic()
        if cached is None or not cached.complete or now - self._checked.get(pid, -1e18) >= TRUST_S:
            # the check resolve() would make for this pid's next event, made now
            found, attribution = self._lookup(pid, self._clock.now_ms())
            if attribution not in (EXACT, CACHED) or found is None or not found.complete:
                return None
            cached = found
        if cached.before is not None or self._view(cached) is not None:
            # either identity may be the one; a container's users are its own: resolve each
            return None
        until = self._checked.get(pid, -1e18) + TRUST_S
        if now >= until:
            return None
        return cached.info.name, cached.euid, until

    def user_of(self, uid: Optional[int]) -> UserInfo:
        return self._user(uid)

    # --- exec records ------------------------------------------------------

    def _on_exec(self, pid: int, path: bytes) -> None:
        if _is_loader(path):
            return
        self._checked.pop(pid, None)
        self._gone.discard(pid)
        self._exec_pending.pop(pid, None)
        self.counters["exec"] += 1
        earlier = self._cache.get(pid)
        full = self._read(pid)
        ns = full.ns if full is not None else self._ns(pid)
        view = self._containers.view(ns, pid) if self._containers is not None else None
        if view is not None:  # a layer's path (lowerdir=...): the one the container sees
            path = view.to_container(path) or path
        if full is not None and (
            full.info.executable == path or _same_file(path, _exe_link(self._root, pid))
        ):  # the same binary seen through another mount (a bind mount) is the same
            if full.comm is not None and not _named_by_exec(full.comm, path, full.info.command_line):
                # renamed itself (prctl, process.title) before we read it: what it wrote in
                # between was written under the name its exec gave it, the executed file's:
                # a script's (its own exec record, just before), else argv[0]'s (python3)
                name = earlier.info.name if earlier is not None and not earlier.complete else None
                argv0 = os.fsencode((full.info.command_line or "").split(" ")[0])
                at_exec = replace(full.info, name=name or _exec_name(argv0 or path))
                full = replace(full, before=replace(full, info=at_exec), since_ms=self._clock.now_ms())
            self._store(pid, full)
            return
        st = self._stat(pid)
        info = ProcessInfo(
            pid=pid,
            name=_exec_name(path),
            executable=path,
            ppid=st[2] if st is not None else None,
            container=view.info if view is not None else None,
        )
        self._store(pid, _Proc(info=info, comm=None, start_ticks=None, euid=None, complete=False, ns=ns))

    def _store(self, pid: int, rec: _Proc) -> None:
        self._cache[pid] = rec
        self._cache.move_to_end(pid)
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)

    # --- lookups -----------------------------------------------------------

    def _lookup(self, pid: int, ts_ms: int) -> tuple[Optional[_Proc], str]:
        """The identity ``pid`` had when it wrote an event read at ``ts_ms``."""
        found, attribution = self._record(pid, ts_ms)
        if found is not None and found.before is not None and ts_ms <= found.since_ms:
            return found.before, UNCERTAIN
        return found, attribution

    def _record(self, pid: int, ts_ms: int) -> tuple[Optional[_Proc], str]:
        cached = self._cache.get(pid)
        now = self._clock.monotonic()
        if cached is not None and now - self._checked.get(pid, -1e18) < TRUST_S:
            if pid in self._gone:  # checked gone this recently: the events it left are read late
                return cached, CACHED
            if cached.complete:
                return cached, EXACT
        found, attribution = self._check(pid, ts_ms, cached)
        if attribution == EXACT or (attribution == CACHED and pid in self._gone):
            self._checked[pid] = now
            if len(self._checked) > 2 * self._size:
                self._checked.clear()
                self._gone.clear()
        return found, attribution

    def _check(self, pid: int, ts_ms: int, cached: Optional[_Proc]) -> tuple[Optional[_Proc], str]:
        self._gone.discard(pid)
        st = self._stat(pid)
        if st is not None:
            _comm, state, _ppid, ticks = st
            started = self._btime + ticks / self._ticks
            if started > ts_ms / 1000.0 + REUSE_SLACK_S:
                self.counters["pid_reused"] += 1  # the writer is gone and its pid taken
            elif state in ("Z", "X") and cached is not None:
                return cached, CACHED
            elif cached is not None and cached.start_ticks in (ticks, None):
                return self._recheck(pid, st, cached)  # the process we knew (or its exec's)
            else:
                full = self._read(pid, st)
                if full is not None:
                    self._store(pid, full)
                    return full, EXACT
        if cached is not None:
            if st is None:
                self._gone.add(pid)
            return cached, CACHED
        return None, UNKNOWN

    def _recheck(self, pid: int, st: tuple[str, str, int, int], cached: _Proc) -> tuple[_Proc, str]:
        """The process we knew, read again: what changed since, and when."""
        if cached.complete and cached.comm == st[0] and self._euid(pid) == cached.euid:
            self._cache.move_to_end(pid)
            return cached, EXACT
        full = self._read(pid, st)
        if full is None:
            return cached, CACHED
        old_exe, new_exe = cached.info.executable, full.info.executable
        if new_exe is None:  # a zombie's exe is unreadable
            full = replace(full, info=replace(full.info, executable=old_exe))
        elif (
            old_exe is not None and new_exe != old_exe and not _same_file(old_exe, _exe_link(self._root, pid))
        ):
            # it exec'd after this event: the exec's record is behind it in the queue
            if len(self._exec_pending) >= self._size:
                self._exec_pending.clear()
            first = self._exec_pending.setdefault(pid, self._clock.monotonic())
            if self._clock.monotonic() - first < EXEC_WAIT_S:
                return cached, CACHED
            self._exec_pending.pop(pid, None)  # no record came: an exec the marks cannot see
            self._store(pid, full)
            return full, UNCERTAIN
        if cached.complete and (cached.comm != full.comm or cached.euid != full.euid):
            # renamed itself or changed user, at a moment the kernel does not report
            full = replace(full, before=replace(cached, before=None), since_ms=self._clock.now_ms())
        self._store(pid, full)
        return full, EXACT

    def _inferred(self, raw: RawEvent) -> tuple[ProcessInfo, UserInfo, str]:
        owner = self._owner(raw.path)
        user = self._user(owner)
        if owner is None or self._is_web is None:
            return ProcessInfo(), user, UNKNOWN
        now = self._clock.monotonic()
        if now - self._plist_at >= PROCESS_LIST_TTL_S:
            self._plist = self._process_list()
            self._plist_at = now
        best: Optional[tuple[float, int]] = None
        for created, pid, name, euid in self._plist:
            if euid == owner and self._is_web(name) and (best is None or created > best[0]):
                best = (created, pid)
        if best is not None:
            found = self._read(best[1])
            if found is not None:
                return found.info, user, INFERRED
        return ProcessInfo(), user, UNKNOWN

    @staticmethod
    def _process_list() -> list[tuple[float, int, str, int]]:
        import psutil  # only inotify mode needs it: 2.7 MB of RSS the fanotify agent spares

        out: list[tuple[float, int, str, int]] = []
        for p in psutil.process_iter(["pid", "name", "uids", "create_time"]):
            try:
                uids = p.info["uids"]
                if uids is None or p.info["name"] is None:
                    continue
                out.append(
                    (
                        float(p.info["create_time"] or 0.0),
                        int(p.info["pid"]),
                        str(p.info["name"]),
                        uids.effective,
                    )
                )
            except (KeyError, AttributeError, TypeError):
                continue
        return out

    def _user(self, uid: Optional[int]) -> UserInfo:
        if uid is None:
            return UserInfo()
        user = self._users.get(uid)
        if user is None:
            try:
                name: Optional[str] = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = None
            if len(self._users) >= 4096:
                self._users.clear()
            user = self._users[uid] = UserInfo(id=str(uid), name=name)
        return user

    @staticmethod
    def _owner(path: Optional[bytes]) -> Optional[int]:
        if path is None:
            return None
        try:
            return longpath.lstat(path).st_uid
        except (OSError, ValueError):
            return None

    # --- /proc readers -----------------------------------------------------

    def _boot_time(self) -> float:
        data = _read_file(f"{self._root}/stat".encode())
        if data is not None:
            for line in data.split(b"\n"):
                if line.startswith(b"btime "):
                    try:
                        return float(line.split()[1])
                    except (IndexError, ValueError):
                        break
        try:
            import psutil

            return float(psutil.boot_time())
        except Exception:  # noqa: BLE001 - no boot time: start times are then relative
            return 0.0

    def _stat(self, pid: int) -> Optional[tuple[str, str, int, int]]:
        """(comm, state, ppid, start ticks) from /proc/P/stat, or None when gone."""
        data = _read_file(b"%s/%d/stat" % (self._root.encode(), pid))
        if data is None:
            return None
        lp = data.find(b"(")
        rp = data.rfind(b")")
        if lp < 0 or rp < lp:
            return None
        rest = data[rp + 2 :].split(b" ")
        try:
            return (
                os.fsdecode(data[lp + 1 : rp]),
                rest[0].decode("ascii", "replace"),
                int(rest[1]),
                int(rest[19]),
            )
        except (IndexError, ValueError):
            return None

    def _euid(self, pid: int) -> Optional[int]:
        return _status_euid(_read_file(b"%s/%d/status" % (self._root.encode(), pid)))

    def _read(self, pid: int, st: Optional[tuple[str, str, int, int]] = None) -> Optional[_Proc]:
        """A full record for a live pid, or None when it is gone."""
        if st is None:
            st = self._stat(pid)
            if st is None:
                return None
        comm, _state, ppid, ticks = st
        base = b"%s/%d/" % (self._root.encode(), pid)
        status = _read_file(base + b"status")
        euid = _status_euid(status)
        exe = _readlink(base + b"exe")
        args = _cmdline(_read_file(base + b"cmdline"))
        parent = self._stat(ppid) if ppid > 0 else None
        info = ProcessInfo(
            pid=pid,
            name=_task_name(comm, args),
            executable=exe,
            ppid=ppid,
            command_line=" ".join(args) if args else None,
            start_time=self._btime + ticks / self._ticks,
            parent_name=_task_name(parent[0], self._args(ppid)) if parent is not None else None,
            parent_executable=_readlink(b"%s/%d/exe" % (self._root.encode(), ppid))
            if parent is not None
            else None,
        )
        ns = self._ns(pid)
        view = self._containers.view(ns, pid) if self._containers is not None else None
        if view is not None:
            info = _as_seen_in(view, info, status)
        # read mid-exec, the new image has no argv yet: keep it, but read again while alive
        return _Proc(info=info, comm=comm, start_ticks=ticks, euid=euid, complete=bool(args), ns=ns)

    def _ns(self, pid: int) -> Optional[int]:
        return self._containers.ns_of(pid) if self._containers is not None else None

    def _args(self, pid: int) -> list[str]:
        return _cmdline(_read_file(b"%s/%d/cmdline" % (self._root.encode(), pid)))


def in_child_pid_namespace(proc_root: str = "/proc") -> bool:
    """Whether this process is in a pid namespace below the host's, where
    fanotify reports pid 0 for writers outside it. The host's namespace has
    a fixed inode number (PROC_PID_INIT_INO) since Linux 3.8."""
    try:
        return os.stat(f"{proc_root}/self/ns/pid").st_ino != PROC_PID_INIT_INO
    except OSError:
        return False


def _exec_name(path: bytes) -> str:
    """The task name an exec of ``path`` gives (the kernel's comm: its base name, cut at 15)."""
    return os.fsdecode(path.rsplit(b"/", 1)[-1][:COMM_LEN])


def _named_by_exec(comm: str, path: bytes, command_line: Optional[str]) -> bool:
    """Whether ``comm`` is the name an exec of ``path`` gave: the base name of
    the file that was executed, of argv[0] (a symlink, as python3), or of
    argv[1] (a script: the kernel names the task after it)."""
    names = [path.rsplit(b"/", 1)[-1]]
    for arg in (command_line or "").split(" ")[:2]:
        names.append(os.fsencode(arg).rsplit(b"/", 1)[-1])
    want = os.fsencode(comm)
    return any(n[:COMM_LEN] == want for n in names)


def _as_seen_in(view: View, info: ProcessInfo, status: Optional[bytes]) -> ProcessInfo:
    """A container's process with its executables as the container names
    them, its container and its pid inside (the last of NSpid's)."""
    vpid = None
    i = status.find(b"\nNSpid:") if status is not None else -1
    if status is not None and i >= 0:
        with contextlib.suppress(IndexError, ValueError):
            vpid = int(status[i + 7 :].split(b"\n", 1)[0].split()[-1])
    return replace(
        info,
        executable=view.to_container(info.executable) or info.executable,
        parent_executable=view.to_container(info.parent_executable) or info.parent_executable,
        container=view.info,
        vpid=vpid,
    )


def _task_name(comm: str, args: list[str]) -> str:
    """psutil's name(): comm, extended from argv[0] when the kernel cut it at 15."""
    if len(comm) >= COMM_LEN and args:
        ext = os.path.basename(args[0])
        if ext.startswith(comm):
            return ext
    return comm


def _cmdline(data: Optional[bytes]) -> list[str]:
    if not data:
        return []
    if data.endswith(b"\0"):
        data = data[:-1]
    parts = data.split(b"\0")
    if len(parts) == 1 and b" " in data:  # a process that rewrote its title (nginx: worker process)
        parts = data.split(b" ")
    return [os.fsdecode(p) for p in parts]


def _read_file(path: bytes) -> Optional[bytes]:
    """Whole small file with raw syscalls: /proc reads are the resolver's hot path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 4096)]  # a 4 KiB first read: stat and status fit, and it is cheap
        while len(chunks[-1]) == 4096 or (len(chunks) == 1 and chunks[0] and not chunks[0].endswith(b"\n")):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks) if len(chunks) > 1 else chunks[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def _exe_link(root: str, pid: int) -> bytes:
    return b"%s/%d/exe" % (root.encode(), pid)


def _same_file(a: Optional[bytes], b: bytes) -> bool:
    """Whether ``a`` and ``b`` (followed) are one file: the exec record's path
    and /proc/PID/exe can name it through different mounts."""
    if a is None:
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _readlink(path: bytes) -> Optional[bytes]:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if target.endswith(_DELETED):
        target = target[: -len(_DELETED)]
    return target


def _status_euid(status: Optional[bytes]) -> Optional[int]:
    """The effective uid from /proc/PID/status (``Uid: real effective saved fs``)."""
    if status is None:
        return None
    i = status.find(b"\nUid:")
    if i < 0:
        return None
    try:
        return int(status[i + 5 :].split(None, 2)[1])
    except (IndexError, ValueError):
        return None
