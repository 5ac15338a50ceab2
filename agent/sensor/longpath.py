"""Paths longer than PATH_MAX: a chain of long directory names is legal, but
the kernel will not name it in one piece (readlink of /proc/self/fd/N and
every path syscall fail with ENAMETOOLONG). A web shell dropped there must
still be reported, with its full path, and its facts read.

Names are found by walking up from the directory's own fd (``..`` at each
step, the child found in its parent by inode) until an ancestor is short
enough to readlink; paths are opened by walking down, a piece shorter than
PATH_MAX at a time, each relative to the last directory's fd.
"""

from __future__ import annotations

import errno
import os
from typing import Optional, Union

PATH_MAX = 4096
MAX_DEPTH = 4096  # levels walked up before giving up (a loop, a race with a rename)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def name_of_fd(fd: int) -> bytes:
    """The path of directory ``fd`` (an O_PATH fd is enough). Raises OSError
    as readlink would when the path cannot be found."""
    try:
        return os.readlink(b"/proc/self/fd/%d" % fd)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    names: list[bytes] = []
    cur = os.open(b".", _DIR_FLAGS, dir_fd=fd)
    try:
        for _ in range(MAX_DEPTH):
            here = os.fstat(cur)
            parent = os.open(b"..", _DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = parent
            names.append(_entry_for(cur, here))
            try:
                top = os.readlink(b"/proc/self/fd/%d" % cur)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                continue
            return top.rstrip(b"/") + b"/" + b"/".join(reversed(names))
    finally:
        os.close(cur)
    raise OSError(errno.ELOOP, "directory chain too deep to name")


def _entry_for(parent_fd: int, child: os.stat_result) -> bytes:
    """The name under which ``child`` is linked in the directory ``parent_fd``."""
    with os.scandir(parent_fd) as entries:
        for entry in entries:
            if entry.inode() == child.st_ino and entry.is_dir(follow_symlinks=False):
                try:
                    st = os.stat(entry.name, dir_fd=parent_fd, follow_symlinks=False)
                except OSError:
                    continue
                if st.st_ino == child.st_ino and st.st_dev == child.st_dev:
                    return os.fsencode(entry.name)
    # a mount point (its parent lists the covered inode) or renamed meanwhile
    raise OSError(errno.ENOENT, "directory no longer linked in its parent")


Stat = Union[os.stat_result, OSError]  # an lstat's result, or why it failed


def lstat_or_error(path: bytes) -> Stat:
    """lstat's result, or its OSError: one read handed to every reader of a
    file's facts (the facts, its package, its content), not one each."""
    try:
        return lstat(path)
    except OSError as exc:
        return exc


def stat_of(path: bytes, st: Optional[Stat]) -> os.stat_result:
    """``st`` when given (raised when it is an error), else an lstat now."""
    if st is None:
        return lstat(path)
    if isinstance(st, OSError):
        raise st
    return st


def lstat(path: bytes) -> os.stat_result:
    """os.lstat, also for a path longer than PATH_MAX or below a container's root."""
    if len(path) < PATH_MAX and not _in_proc_root(path):
        return os.lstat(path)
    parent, name = _walk_down(path)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def open_file(path: bytes, flags: int) -> int:
    """os.open, also for a path longer than PATH_MAX or below a container's root."""
    if len(path) < PATH_MAX and not _in_proc_root(path):
        return os.open(path, flags)
    parent, name = _walk_down(path)
    try:
        return os.open(name, flags, dir_fd=parent)
    finally:
        os.close(parent)


def open_dir_below(root: bytes, rel: bytes) -> int:
    """An O_PATH fd on directory ``rel`` below ``root`` (a container's
    /proc/PID/root), no symlink followed on the way: a symlink in a
    container resolves against the agent's root, the host's."""
    fd, name = _walk_down(root.rstrip(b"/") + b"/" + rel.strip(b"/") + b"/.")
    try:
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def open_parent(path: bytes) -> tuple[int, bytes]:
    """(an O_PATH fd on the directory holding ``path``, its last name), no
    symlink followed on the way: what a root process acting on a path an
    unprivileged user can change (a quarantine, a restore) must hold."""
    return _walk_down(path)


def _in_proc_root(path: bytes) -> bool:
    parts = path.split(b"/", 4)
    return len(parts) > 3 and parts[1] == b"proc" and parts[3] == b"root"


def _walk_down(path: bytes) -> tuple[int, bytes]:
    """(fd of the last directory of ``path``, the final name), opened a piece
    at a time. Symlinks are not followed on the way: a path the kernel
    reported has none. Below /proc/PID/root, that magic link is followed
    (into the container's root) and nothing after it."""
    head, _, name = path.rpartition(b"/")
    if not name:
        raise OSError(errno.ENOENT, "no file name in path")
    start = b"/"
    if _in_proc_root(head + b"/"):
        parts = head.split(b"/", 4)
        start, head = b"/".join(parts[:4]), b"/" + (parts[4] if len(parts) > 4 else b"")
    fd = os.open(start, _DIR_FLAGS)
    try:
        for part in head.split(b"/"):
            if not part:
                continue
            nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, name
