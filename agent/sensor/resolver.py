"""pid -> process and user: turns a source's RawEvent into a FileEvent.

/proc is read directly (stat, status, exe, cmdline): cheaper than psutil per
event, and a cache hit costs one read of /proc/P/stat to prove the pid still
names the same process (same start time, same comm). Exec events are read
at once and remembered, because a writer that exits at once (a one-liner
dropped by a web shell) is gone before its file event is read.
"""

from __future__ import annotations

import os
import pwd
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Optional

from agent.shared.clock import Clock
from agent.shared.events import (
    CACHED,
    CREATION,
    EXACT,
    EXEC,
    INFERRED,
    OVERFLOW,
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
_DELETED = b" (deleted)"


@dataclass(frozen=True)
class _Proc:
    """What we know of one process; ``complete`` when read from its live /proc."""

    info: ProcessInfo
    comm: Optional[str]
    start_ticks: Optional[int]
    euid: Optional[int]
    complete: bool


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
    ) -> None:
        self._clock = clock
        self._size = max(1, exec_cache_size)
        self._root = proc_root.rstrip("/") or "/"
        self._is_web = is_web_process
        self._cache: OrderedDict[int, _Proc] = OrderedDict()
        self._checked: dict[int, float] = {}  # pid -> monotonic time of its last /proc check
        self._gone: set[int] = set()  # pids whose last check found no process (cached record kept)
        self._users: dict[int, UserInfo] = {}  # one shared object per uid
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._btime = self._boot_time()
        self._plist: list[tuple[float, int, str, int]] = []
        self._plist_at = -1e18
        self.counters = {"exact": 0, "cached": 0, "inferred": 0, "unknown": 0, "exec": 0, "pid_reused": 0}

    # --- public ------------------------------------------------------------

    def resolve(self, raw: RawEvent) -> Optional[FileEvent]:
        """A FileEvent for a creation or rename; None for exec and overflow records."""
        if raw.kind == EXEC:
            if raw.pid is not None and raw.path is not None:
                self._on_exec(raw.pid, raw.path)
            return None
        if raw.kind == OVERFLOW:
            return None
        if raw.pid is None:
            proc, user, attribution = self._inferred(raw)
        else:
            found, attribution = self._lookup(raw.pid, raw.ts_ms)
            proc = found.info if found is not None else ProcessInfo(pid=raw.pid)
            euid = found.euid if found is not None else None
            if euid is None and raw.kind == CREATION:
                euid = self._owner(raw.path)  # a new file's owner is its creator's fsuid
            user = self._user(euid)
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
        self.counters["exec"] += 1
        full = self._read(pid)
        if full is not None and full.info.executable == path:
            self._store(pid, full)
            return
        st = self._stat(pid)
        base = path.rsplit(b"/", 1)[-1][:COMM_LEN]
        info = ProcessInfo(
            pid=pid,
            name=os.fsdecode(base),
            executable=path,
            ppid=st[2] if st is not None else None,
        )
        self._store(pid, _Proc(info=info, comm=None, start_ticks=None, euid=None, complete=False))

    def _store(self, pid: int, rec: _Proc) -> None:
        self._cache[pid] = rec
        self._cache.move_to_end(pid)
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)

    # --- lookups -----------------------------------------------------------

    def _lookup(self, pid: int, ts_ms: int) -> tuple[Optional[_Proc], str]:
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
            comm, state, _ppid, ticks = st
            started = self._btime + ticks / self._ticks
            if started > ts_ms / 1000.0 + REUSE_SLACK_S:
                self.counters["pid_reused"] += 1  # the writer is gone and its pid taken
            elif state in ("Z", "X") and cached is not None:
                return cached, CACHED
            elif (
                cached is not None
                and cached.complete
                and cached.start_ticks == ticks
                and cached.comm == comm
                and self._euid(pid) == cached.euid  # a server that dropped root after we cached it
            ):
                self._cache.move_to_end(pid)
                return cached, EXACT
            else:
                full = self._read(pid, st)
                if full is not None:
                    if full.info.executable is None and cached is not None:  # zombie: exe unreadable
                        full = replace(full, info=replace(full.info, executable=cached.info.executable))
                    self._store(pid, full)
                    return full, EXACT
        if cached is not None:
            if st is None:
                self._gone.add(pid)
            return cached, CACHED
        return None, UNKNOWN

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
            return os.lstat(path).st_uid
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
        euid = _status_euid(_read_file(base + b"status"))
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
        # read mid-exec, the new image has no argv yet: keep it, but read again while alive
        return _Proc(info=info, comm=comm, start_ticks=ticks, euid=euid, complete=bool(args))

    def _args(self, pid: int) -> list[str]:
        return _cmdline(_read_file(b"%s/%d/cmdline" % (self._root.encode(), pid)))


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
