"""fanotify's kernel ABI: constants, raw syscalls through libc, pure buffer parsing.

Kept apart from :mod:`agent.sensor.sources.fanotify.source` so the parser can be tested
with synthetic buffers and no privileges. The parser never raises: a short
or odd buffer stops parsing and the reason is returned with what was read.
Layouts follow ``include/uapi/linux/fanotify.h``.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any, Callable, NamedTuple, Optional

from agent.sensor.libc import libc

# fanotify_init() flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
FAN_ENABLE_AUDIT = 0x00000040
FAN_REPORT_PIDFD = 0x00000080  # 5.15
FAN_REPORT_TID = 0x00000100
FAN_REPORT_FID = 0x00000200  # 5.1
FAN_REPORT_DIR_FID = 0x00000400  # 5.9
FAN_REPORT_NAME = 0x00000800  # 5.9
FAN_REPORT_TARGET_FID = 0x00001000  # 5.17
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_REPORT_DFID_NAME_TARGET = FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID

# fanotify_mark() flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_ONLYDIR = 0x00000008
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_EVICTABLE = 0x00000200
FAN_MARK_IGNORE = 0x00000400  # 6.0
FAN_MARK_INODE = 0x00000000
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_FILESYSTEM = 0x00000100
FAN_MARK_IGNORE_SURV = FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY

# event mask bits
FAN_ACCESS = 0x00000001
FAN_MODIFY = 0x00000002
FAN_ATTRIB = 0x00000004
FAN_CLOSE_WRITE = 0x00000008
FAN_CLOSE_NOWRITE = 0x00000010
FAN_OPEN = 0x00000020
FAN_MOVED_FROM = 0x00000040
FAN_MOVED_TO = 0x00000080
FAN_CREATE = 0x00000100
FAN_DELETE = 0x00000200
FAN_DELETE_SELF = 0x00000400
FAN_MOVE_SELF = 0x00000800
FAN_OPEN_EXEC = 0x00001000
FAN_Q_OVERFLOW = 0x00004000
FAN_FS_ERROR = 0x00008000
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_RENAME = 0x10000000  # 5.17
FAN_ONDIR = 0x40000000

# info record types
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_PIDFD = 4
FAN_EVENT_INFO_TYPE_ERROR = 5
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12
FID_TYPES = frozenset(
    {
        FAN_EVENT_INFO_TYPE_FID,
        FAN_EVENT_INFO_TYPE_DFID_NAME,
        FAN_EVENT_INFO_TYPE_DFID,
        FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
        FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    }
)
NAMED_TYPES = frozenset(
    {
        FAN_EVENT_INFO_TYPE_DFID_NAME,
        FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
        FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    }
)

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1
FAN_NOPIDFD = FAN_NOFD
FAN_EPIDFD = -2

# open(2) flags that the os module may lack on some builds
O_PATH = getattr(os, "O_PATH", 0o10000000)
O_LARGEFILE = getattr(os, "O_LARGEFILE", 0)  # 0 on 64-bit, where it is implied
AT_FDCWD = -100

# struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
# metadata_len u16, mask u64 (aligned), fd s32, pid s32
METADATA = struct.Struct("=IBBHQii")
# struct fanotify_event_info_header: info_type u8, pad u8, len u16
INFO_HEADER = struct.Struct("=BBH")
# __kernel_fsid_t (two s32, read unsigned) then struct file_handle header
FSID = struct.Struct("=II")
FILE_HANDLE = struct.Struct("=Ii")
_FID_FIXED = INFO_HEADER.size + FSID.size + FILE_HANDLE.size  # 16
MAX_HANDLE_SZ = 128


class FidRecord(NamedTuple):
    """One fid info record: the object's filesystem and handle, maybe a name.

    ``key`` is the record's raw fsid + ``struct file_handle`` bytes: hashable,
    taken with one slice, and what a cache of resolved handles is keyed by.
    """

    info_type: int
    key: bytes
    name: Optional[bytes] = None

    @property
    def fsid(self) -> tuple[int, int]:
        a, b = FSID.unpack_from(self.key, 0)
        return (a, b)

    @property
    def handle_type(self) -> int:
        return int(FILE_HANDLE.unpack_from(self.key, FSID.size)[1])

    @property
    def handle(self) -> bytes:
        return self.key[FSID.size + FILE_HANDLE.size :]


class ParsedEvent(NamedTuple):
    """One event from a read() buffer: metadata plus its info records."""

    mask: int
    fd: int
    pid: int
    records: tuple[FidRecord, ...] = ()

    def record(self, info_type: int) -> Optional[FidRecord]:
        for rec in self.records:
            if rec[0] == info_type:
                return rec
        return None


class ParseResult(NamedTuple):
    """What :func:`parse_buffer` read; ``error`` says why it stopped early."""

    events: list[ParsedEvent]
    error: Optional[str] = None


def parse_buffer(buf: bytes) -> ParseResult:  # noqa: PLR0912 - one flat loop on the hot path
    """Split a fanotify read() buffer into events. Never raises.

    A truncated or inconsistent event stops parsing; events before it are
    returned and ``error`` describes the problem. A malformed info record
    only drops that record's event.

    This runs once per kernel event on a busy host, so it is one flat loop
    with the structs bound to locals and tuples for results.
    """
    events: list[ParsedEvent] = []
    append = events.append
    unpack_meta = METADATA.unpack_from
    unpack_info = INFO_HEADER.unpack_from
    unpack_handle = FILE_HANDLE.unpack_from
    fid_types, named_types = FID_TYPES, NAMED_TYPES
    msize, hsize = METADATA.size, INFO_HEADER.size
    off = 0
    total = len(buf)
    while off < total:
        if total - off < msize:
            return ParseResult(events, f"short_metadata off={off} left={total - off}")
        event_len, vers, _res, meta_len, mask, fd, pid = unpack_meta(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            return ParseResult(events, f"bad_version off={off} vers={vers}")
        if meta_len < msize or event_len < meta_len:
            return ParseResult(events, f"bad_length off={off} event_len={event_len} metadata_len={meta_len}")
        end = off + event_len
        if end > total:
            return ParseResult(events, f"short_event off={off} event_len={event_len} left={total - off}")
        records: list[FidRecord] = []
        err: Optional[str] = None
        p = off + meta_len
        while p < end:
            if end - p < hsize:
                err = f"short_info_header off={p}"
                break
            info_type, _pad, rec_len = unpack_info(buf, p)
            rend = p + rec_len
            if rec_len < hsize or rend > end:
                err = f"bad_info_len off={p} len={rec_len}"
                break
            if info_type in fid_types:
                if rec_len < _FID_FIXED:
                    err = f"short_fid off={p} len={rec_len}"
                    break
                handle_bytes = unpack_handle(buf, p + 12)[0]
                hend = p + _FID_FIXED + handle_bytes
                if hend > rend:
                    err = f"bad_handle_len off={p} handle_bytes={handle_bytes}"
                    break
                name: Optional[bytes] = None
                if info_type in named_types:
                    nul = buf.find(b"\0", hend, rend)
                    name = buf[hend : rend if nul < 0 else nul]
                records.append(FidRecord(info_type, buf[p + hsize : hend], name))
            # other record types (pidfd, error, range, mount...) are skipped by length
            p = rend
        if err is not None:
            return ParseResult(events, f"{err} event_off={off}")
        append(ParsedEvent(mask, fd, pid, tuple(records)))
        off = end
    return ParseResult(events)


def pack_metadata(mask: int, fd: int, pid: int, info: bytes = b"") -> bytes:
    """Build one event as the kernel would (tests and fakes use it)."""
    return (
        METADATA.pack(METADATA.size + len(info), FANOTIFY_METADATA_VERSION, 0, METADATA.size, mask, fd, pid)
        + info
    )


def pack_fid(
    info_type: int, fsid: tuple[int, int], handle_type: int, handle: bytes, name: Optional[bytes] = None
) -> bytes:
    """Build one fid info record, padded to 4 bytes like the kernel."""
    body = FSID.pack(*fsid) + FILE_HANDLE.pack(len(handle), handle_type) + handle
    if name is not None:
        body += name + b"\0"
    length = INFO_HEADER.size + len(body)
    pad = (-length) % 4
    return INFO_HEADER.pack(info_type, 0, length + pad) + body + b"\0" * pad


def fsid_of_statvfs(f_fsid: int) -> tuple[int, int]:
    """The kernel's two-word fsid from ``os.statvfs().f_fsid`` (glibc packs val[1] high)."""
    return (f_fsid & 0xFFFFFFFF, (f_fsid >> 32) & 0xFFFFFFFF)


class _Libc:
    """Lazily bound libc functions; ``None`` members where libc lacks them."""

    def __init__(self) -> None:
        self.lib = libc()
        self.fanotify_init = self._bind("fanotify_init", [ctypes.c_uint, ctypes.c_uint])
        self.fanotify_mark = self._bind(
            "fanotify_mark", [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        )
        self.open_by_handle_at = self._bind(
            "open_by_handle_at", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        )

    def _bind(self, name: str, argtypes: list[Any]) -> Optional[Callable[..., Any]]:
        fn: Any = getattr(self.lib, name, None)
        if fn is None:
            return None
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]


_libc: Optional[_Libc] = None


def _get_libc() -> _Libc:
    global _libc  # noqa: PLW0603 - one binding per process, made on first use
    if _libc is None:
        _libc = _Libc()
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2); raises OSError with the errno."""
    fn = _get_libc().fanotify_init
    if fn is None:
        raise OSError(38, "fanotify_init: not in libc")  # ENOSYS
    return _check(int(fn(flags, event_f_flags)), "fanotify_init")


def fanotify_mark(fd: int, flags: int, mask: int, dirfd: int, path: Optional[bytes]) -> None:
    """fanotify_mark(2); raises OSError with the errno."""
    fn = _get_libc().fanotify_mark
    if fn is None:
        raise OSError(38, "fanotify_mark: not in libc")
    _check(int(fn(fd, flags, mask, dirfd, path)), "fanotify_mark")


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) for a handle taken from a fid record."""
    fn = _get_libc().open_by_handle_at
    if fn is None:
        raise OSError(38, "open_by_handle_at: not in libc")
    raw = FILE_HANDLE.pack(len(handle), handle_type) + handle
    return _check(int(fn(mount_fd, raw, flags)), "open_by_handle_at")
